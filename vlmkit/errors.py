"""Exception types users can catch. Every message says what was wrong, where, and what to do."""


class VlmkitError(Exception):
    """Base class of every error vlmkit raises on purpose."""


class ConfigError(VlmkitError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class CheckpointError(VlmkitError):
    """A checkpoint directory is missing files, holds unexpected tensors, or has mismatched shapes."""


class BadRecordError(VlmkitError, ValueError):
    """One data record cannot be used; `reason` is a short stable key used for counting."""

    def __init__(self, reason: str, message: str, record_id: str | None = None):
        self.reason = reason
        self.record_id = record_id
        where = f" (record {record_id})" if record_id is not None else ""
        super().__init__(f"{reason}: {message}{where}")

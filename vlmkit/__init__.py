"""vlmkit: build, train, evaluate and serve vision-language models (vision encoder -> adapter -> LLM)."""

__version__ = "0.1.0"

__all__ = ["VLM", "__version__"]


def __getattr__(name):
    # Lazy so that `import vlmkit` (and `vlmkit --help`) does not pay for torch until needed.
    if name == "VLM":
        from vlmkit.api import VLM

        return VLM
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")

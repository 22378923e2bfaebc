"""The run config: what to build, what data to read, and the stages to train through.

A YAML file maps onto these dataclasses one to one. Every setting has exactly one home (a field
with a docstring), is checked when the config loads (unknown keys and wrong types fail at start
with the dotted path of the offending field), and can be overridden from the command line:

    vlmkit train tiny --set stages.0.steps=20 --set model.config.llm.num_layers=2

Override values are parsed as YAML (`true`, `3`, `1.0e-3`, `[a, b]`, `{x: 1}`), then the whole
config is validated again, so an override is held to the same rules as the file.

Follows torchtitan's job config (one dataclass per section, validated) and nanoVLM's per-part
learning rates, where 0 means frozen. The model's own shape lives in `vlmkit.models.config`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmkit.data.world import WorldSpec
from vlmkit.errors import ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.schema import build, require_at_least

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The ready configs, shipped inside the package (so an installed wheel has them too);
`vlmkit train tiny` resolves a bare name here."""

ModuleName = Literal["vision", "adapter", "llm"]
MODULES: tuple[str, ...] = ("vision", "adapter", "llm")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """Where the model comes from: exactly one of `config`, `pretrained`, `hf_llava`, or the
    `hf_vision` + `hf_llm` pair (assembled with a fresh adapter)."""

    config: dict | None = None
    """A VLMConfig as a mapping (vision / adapter / llm / image_token_id ..., or native_vision /
    llm with mrope_section for a native-resolution model): a fresh model."""
    pretrained: str | None = None
    """A model directory as `VLM.load` reads it: a vlmkit checkpoint (config.json +
    model.safetensors + tokenizer), or a whole transformers VLM directory (a Qwen2-VL / Qwen2.5-VL /
    Qwen3-VL one with its tokenizer and processor settings, or llava-hf)."""
    hf_llava: str | None = None
    """A llava-hf model directory (LlavaForConditionalGeneration, saved with save_pretrained)."""
    hf_vision: str | None = None
    """A HF SigLIP / CLIP vision model directory; used with hf_llm."""
    hf_llm: str | None = None
    """A HF Llama / Qwen2 / Qwen3 / Mistral causal-LM directory; used with hf_vision."""
    adapter: dict | None = None
    """AdapterConfig mapping for the hf_vision + hf_llm assembly (default: pixel_shuffle)."""

    def __post_init__(self):
        chosen = [name for name in ("config", "pretrained", "hf_llava") if getattr(self, name) is not None]
        if self.hf_vision is not None or self.hf_llm is not None:
            if self.hf_vision is None or self.hf_llm is None:
                raise ConfigError("model: hf_vision and hf_llm go together; set both")
            chosen.append("hf_vision+hf_llm")
        if len(chosen) != 1:
            raise ConfigError("model: set exactly one of config, pretrained, hf_llava, or hf_vision+hf_llm; "
                              f"got {chosen or 'none'}")
        if self.config is not None:  # fail at load time, not after data preparation
            build(VLMConfig, self.config, "model.config")
        if self.adapter is not None and self.hf_vision is None:
            raise ConfigError("model.adapter is only used with hf_vision + hf_llm")

    @property
    def kind(self) -> str:
        if self.config is not None:
            return "config"
        if self.pretrained is not None:
            return "pretrained"
        if self.hf_llava is not None:
            return "hf_llava"
        return "hf"


@dataclass
class TokenizerSpec:
    """Which tokenizer turns text into ids."""

    path: str | None = None
    """A tokenizer directory (tokenizer.json + tokenizer_config.json). None: the model's own
    (pretrained / hf_* checkpoints bring one)."""

    def __post_init__(self):
        if self.path is not None and not self.path:
            raise ConfigError("tokenizer.path: empty string; leave it out to use the model's tokenizer")


@dataclass
class DataSource:
    """One data file or directory, read by a format reader of vlmkit.data.formats."""

    path: str = ""
    """File or directory (relative paths are relative to the config file's directory)."""
    format: str = "auto"
    """llava | messages | text | parquet | webdataset | auto (guess from the extension / content)."""
    root: str | None = None
    """Directory that relative image paths are resolved against (default: the file's directory)."""
    weight: float = 1.0
    """Default sampling weight of this source in a stage mixture."""
    kind: Literal["chat", "caption", "text"] | None = None
    """What is supervised: chat (assistant turns), caption (the caption), text (every token).
    None: the reader's default for the format."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data source: path is required")
        if self.weight < 0:
            raise ConfigError(f"data source {self.path}: weight must be >= 0, got {self.weight}")


@dataclass
class Stage:
    """One training stage: which modules learn, from which data, for how long, and how."""

    name: str = "stage"
    """Shown in logs and in the checkpoint's stage history."""
    # --- what learns -------------------------------------------------------------------------
    vision_lr: float = 0.0
    """Peak learning rate of the vision encoder; 0 freezes it."""
    adapter_lr: float = 1e-3
    """Peak learning rate of the adapter; 0 freezes it."""
    llm_lr: float = 0.0
    """Peak learning rate of the LLM (embeddings, blocks, head); 0 freezes it."""
    # --- data ----------------------------------------------------------------------------------
    mixture: dict[str, float] = field(default_factory=dict)
    """Source name -> sampling weight for this stage. Empty: every source with its own weight."""
    modality_warmup_steps: int = 0
    """Modality warm-up (DeepSeek-VL): the share of image batches grows linearly from
    `image_share_start` to the share the mixture implies over this many steps. 0: off."""
    image_share_start: float = 0.0
    """Share of image (multimodal) batches at step 0 of the modality warm-up."""
    # --- length and batch ----------------------------------------------------------------------
    steps: int = 100
    """Optimizer steps of this stage."""
    token_budget: int = 2048
    """Tokens per packed micro-batch (samples are concatenated up to this budget, no padding)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the sum of token losses over all of them
    divided by their total number of targets."""
    # --- optimisation ---------------------------------------------------------------------------
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    """Learning-rate schedule after the warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """cosine: the final learning rate as a fraction of the peak."""
    step_every: int = 1000
    """step: multiply the learning rate by `step_gamma` every this many steps."""
    step_gamma: float = 0.1
    """step: the decay factor."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to matrices only, not to norms and biases)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast (GPUs; bf16 matmuls are slow on CPUs without bf16 instructions)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    seed: int = 0
    """Seeds data order, mixture draws and dropout of this stage (combined with the stage index)."""
    # --- bookkeeping ----------------------------------------------------------------------------
    log_every: int = 1
    """Write a metrics line every this many steps."""
    eval_every: int = 0
    """Held-out loss every this many steps (needs run.eval_sources); 0: only at the stage end."""
    save_every: int = 0
    """Checkpoint every this many steps (and always at the stage end); 0: stage end only."""
    keep_last: int = 2
    """Mid-run checkpoints to keep (stage-end checkpoints of earlier stages are pruned too)."""

    def __post_init__(self):
        where = f"stage {self.name!r}"
        for module in MODULES:
            lr = getattr(self, f"{module}_lr")
            if lr < 0:
                raise ConfigError(f"{where}: {module}_lr must be >= 0 (0 freezes), got {lr}")
        if not any(getattr(self, f"{m}_lr") > 0 for m in MODULES):
            raise ConfigError(f"{where}: every module is frozen (vision_lr, adapter_lr, llm_lr all 0)")
        require_at_least(self, ("steps", "token_budget", "grad_accum", "log_every", "keep_last", "step_every"), 1,
                         f"{where}: ")
        require_at_least(self, ("warmup_steps", "modality_warmup_steps", "eval_every", "save_every"), 0, f"{where}: ")
        if not 0.0 <= self.image_share_start <= 1.0:
            raise ConfigError(f"{where}: image_share_start must be in [0, 1], got {self.image_share_start}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}: betas must be two numbers in [0, 1), got {list(self.betas)}")
        for src, w in self.mixture.items():
            if w < 0:
                raise ConfigError(f"{where}: mixture weight of {src!r} must be >= 0, got {w}")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ConfigError(f"{where}: mixture weights sum to 0")

    def lr_of(self, module: str) -> float:
        return float(getattr(self, f"{module}_lr"))


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(config={}))
    """Where the model comes from."""
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    """Which tokenizer to use."""
    world: WorldSpec | None = None
    """A synthetic world to generate (once) and train on; None for data of your own."""
    data: dict[str, DataSource] = field(default_factory=dict)
    """Named data sources; stages refer to them by name in their mixtures."""
    eval_sources: list[str] = field(default_factory=list)
    """Sources whose held-out loss is measured at eval points (not trained on by that name)."""
    eval_batches: int = 4
    """Packed micro-batches of each eval source per eval point."""
    stages: list[Stage] = field(default_factory=list)
    """The curriculum, in order; the model hands over from one stage to the next."""
    seed: int = 0
    """Seeds the initialisation of new weights (a fresh model, a fresh adapter)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of records of a source cannot be used (counted, skipped)."""
    num_threads: int = 0
    """torch intra-op threads on the CPU; 0 keeps torch's default."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events (DIR/tensorboard/)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    base_dir: str = ""
    """Directory relative data paths resolve against; set to the config file's directory on load."""

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        for i, stage in enumerate(self.stages):
            names = stage.mixture or {n: s.weight for n, s in self.data.items()}
            unknown = sorted(set(names) - set(self.data))
            if unknown:
                raise ConfigError(f"stages.{i}.mixture: unknown source(s) {unknown}; "
                                  f"data defines {sorted(self.data)}")
            if not names or sum(names.values()) <= 0:
                raise ConfigError(f"stages.{i}: no data (define sources under `data:` or a mixture)")
        unknown = sorted(set(self.eval_sources) - set(self.data))
        if unknown:
            raise ConfigError(f"eval_sources: unknown source(s) {unknown}; data defines {sorted(self.data)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        require_at_least(self, ("num_threads",), 0)

    def resolve(self, path: str | None) -> str | None:
        """A path from the config, made absolute against the world's dir or base_dir."""
        if path is None:
            return None
        p = Path(path).expanduser()
        base = self.world.dir if self.world is not None else self.base_dir
        return str(p if p.is_absolute() or not base else Path(base).absolute() / p)

    def stage_mixture(self, index: int) -> dict[str, float]:
        stage = self.stages[index]
        return dict(stage.mixture) if stage.mixture else {n: s.weight for n, s in self.data.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.0.steps=20")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty component in the dotted key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config mapping (a copy is returned)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            path = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(node, key, path, item)]
            elif isinstance(node, dict):
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
            else:
                raise ConfigError(f"--set {item!r}: {path} is a {type(node).__name__}, not a section")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(keys), item)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is not a section")
    return raw


def _list_index(node: list, key: str, path: str, item: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"--set {item!r}: {path}: index {key!r} out of range (the list has {len(node)} items)")
    return int(key)


def find_config(name_or_path: str) -> Path:
    """A config path (an existing file), or a bare name (`tiny`, `demo.yaml`) of a ready config in
    CONFIG_DIR. A name with a directory part is only ever a path."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.name == name_or_path:
        for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    ready = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not one of the ready configs {ready}")


def load_config(name_or_path: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or take a mapping), apply `--set` overrides, validate."""
    if isinstance(name_or_path, dict):
        raw, base = name_or_path, ""
    else:
        path = find_config(str(name_or_path))
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        base = str(path.resolve().parent)
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("base_dir", base)
    return build(RunConfig, raw)

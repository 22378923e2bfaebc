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
from vlmkit.models.config import LoRAConfig, VLMConfig
from vlmkit.schema import build, require_at_least

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The ready configs, shipped inside the package (so an installed wheel has them too);
`vlmkit train tiny` resolves a bare name here."""

ModuleName = Literal["vision", "adapter", "llm"]
MODULES: tuple[str, ...] = ("vision", "adapter", "llm")
StageKind = Literal["sft", "contrastive", "dpo", "grpo"]
STAGE_KINDS: tuple[str, ...] = ("sft", "contrastive", "dpo", "grpo")
CheckerName = Literal["exact", "choice", "number", "world"]
"""The reward checkers of a grpo stage (train/rewards.py, `CHECKERS`)."""
DEFAULT_ROUTES: dict[str, str] = {"count": "number", "count_attribute": "number", "arithmetic": "number",
                                  "multiple_choice": "choice"}
"""The reward router's defaults over the synthetic world's categories: counts and sums compare as
numbers, multiple choice by option; every other category gets the world's own checker
(`default_checker`), which reads a reply by its question's kind as the evaluation does."""


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
    model.safetensors + tokenizer), or a whole transformers VLM directory with its tokenizer and
    processor settings (Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE, InternVL, Idefics3 / SmolVLM,
    LLaVA-OneVision, DeepSeek-VL and its hybrid, or llava-hf)."""
    hf_llava: str | None = None
    """A llava-hf model directory (LlavaForConditionalGeneration, saved with save_pretrained)."""
    hf_vision: str | None = None
    """A HF SigLIP / CLIP vision model directory; used with hf_llm."""
    hf_llm: str | None = None
    """A HF Llama / Qwen2 / Qwen3 / Mistral causal-LM directory; used with hf_vision."""
    adapter: dict | None = None
    """AdapterConfig mapping for the hf_vision + hf_llm assembly (default: pixel_shuffle)."""
    processor: dict | None = None
    """A native-resolution model's image and video sizing over its checkpoint's or family's
    (data/native_images.py's SIZING_SETTINGS, e.g. `{min_pixels: 7056}`: small images scaled up to
    84 x 84 pixels' worth of visual tokens); the trained model keeps them (its processor.json)."""

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
        if self.processor is not None:  # its values are checked against the model's own settings in build_model
            # Deferred: data/native_images.py imports torch, which loading a config does without.
            from vlmkit.data.native_images import check_sizing_keys
            check_sizing_keys(self.processor)

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
class ContrastiveSettings:
    """A `kind: contrastive` stage: the vision tower learns from image-caption pairs with SigLIP's
    sigmoid loss (train/contrastive.py)."""

    heads_lr: float = 1e-3
    """Peak learning rate of the stage's own heads (text side, projections, temperature and bias)."""
    temperature_init: float = 10.0
    """Initial logit scale t = exp(t'), SigLIP's 10."""
    bias_init: float = -10.0
    """Initial logit bias b, SigLIP's -10."""
    pairs_per_step: int = 64
    """Image-caption pairs per micro-batch: the sigmoid loss scores each micro-batch's pairs all
    against all (grad_accum micro-batches make a step)."""
    embed_dim: int = 128
    """Size of the shared image-text embedding space."""
    image_patch_dim: int = 32
    """The image head projects each patch to this many values, then all patches in their places
    to the embedding (models/contrastive.py, `ImageHead`)."""
    text_layers: int = 2
    """Blocks of the stage's own text tower (models/contrastive.py, `TextTower`), dropped at the
    stage end; 0: a bag of its own word embeddings (cheaper, blind to word order)."""
    text_hidden_size: int = 128
    """Width of the text tower."""
    text_heads: int = 4
    """Attention heads of the text tower."""
    max_caption_tokens: int = 77
    """Captions are cut to this many tokens, their end-of-text token included (CLIP's 77)."""
    eval_source: str | None = None
    """Data source of the held-out pairs for zero-shot retrieval (image -> caption, caption ->
    image). None: the first caption source among the run's eval_sources, if any."""
    eval_pairs: int = 128
    """Held-out pairs retrieval is measured over (the first ones of the source, in file order)."""

    def __post_init__(self):
        if self.heads_lr < 0:
            raise ConfigError(f"contrastive.heads_lr must be >= 0, got {self.heads_lr}")
        if self.temperature_init <= 0:
            raise ConfigError(f"contrastive.temperature_init must be > 0, got {self.temperature_init}")
        require_at_least(self, ("pairs_per_step", "embed_dim", "image_patch_dim", "text_hidden_size", "text_heads",
                                "max_caption_tokens", "eval_pairs"), 1, "contrastive.")
        require_at_least(self, ("text_layers",), 0, "contrastive.")
        if self.text_hidden_size % self.text_heads:
            raise ConfigError(f"contrastive.text_hidden_size {self.text_hidden_size} must be divisible by "
                              f"text_heads {self.text_heads}")


@dataclass
class DPOSettings:
    """A `kind: dpo` stage: direct preference optimisation on chosen / rejected replies (train/dpo.py).
    The stage reads every source of its mixture as preference pairs (data/preference.py: vlmkit's
    JSONL layout or TRL's columns); a source's `format` then names only the container (auto,
    parquet, hf_dataset)."""

    beta: float = 0.1
    """Strength of the implicit KL to the reference: the loss is -log sigmoid(beta * margin)."""
    sft_weight: float = 0.0
    """Weight of an added next-token loss on the chosen reply (0: pure DPO)."""
    reference: Literal["copy", "lora_disabled", "precomputed"] = "copy"
    """Where the reference log-probs come from: a frozen copy of the stage's starting model, the
    same model with its LoRA adapters disabled (needs `lora`), or computed once before the first
    step by the frozen start model."""
    eval_source: str | None = None
    """A data source of held-out pairs: their reward accuracy, margin and loss at the stage's eval
    points (its first `eval_batches` packs). None: no held-out pairs. Never trained on."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")


@dataclass
class GRPOSettings:
    """A `kind: grpo` stage: group-relative policy optimisation with verifiable rewards
    (train/grpo.py)."""

    prompts_per_step: int = 8
    """Prompts per rollout batch (each sampled `group_size` times)."""
    group_size: int = 8
    """G: samples per prompt; advantages are normalised within each group."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_new_tokens: int = 32
    """Longest reply a rollout may write."""
    clip_low: float = 0.2
    """The ratio is clipped to [1 - clip_low, 1 + clip_high] (clip-higher: clip_high > clip_low)."""
    clip_high: float = 0.28
    kl_coef: float = 0.0
    """Weight of the KL to the reference model (0: no reference is kept)."""
    format_reward: float = 0.0
    """Added reward for a reply in the expected format (0: off)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (no signal) and refill the batch with new prompts."""
    refill_rounds: int = 2
    """Dynamic sampling: at most this many extra rollout rounds refill a step's dropped groups;
    a step still short after them trains on the groups it kept."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout batch; 1 is fully on-policy."""
    routes: dict[str, CheckerName] = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    """The reward router: the checker (train/rewards.py) of each task category; a category not
    listed gets `default_checker`. A prompt's category is its record's `category` metadata or the
    suffix of its id after the last "-" (the world's single-question records: `val_12-count`)."""
    default_checker: CheckerName = "world"
    """The checker of a category missing from `routes`, and of prompts without a category."""
    categories: list[str] | None = None
    """Ask only prompts of these categories (others are skipped, uncounted); None: every prompt."""

    def __post_init__(self):
        require_at_least(self, ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_rollout"), 1,
                         "grpo.")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature must be > 0, got {self.temperature}")
        for name in ("clip_low", "clip_high", "kl_coef", "format_reward", "refill_rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"grpo.{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_low >= 1:
            raise ConfigError(f"grpo.clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), "
                              f"got {self.clip_low}")


@dataclass
class ReplaySettings:
    """Supervised micro-batches replayed beside a stage's own data or objective:
    each step also backpropagates `weight` times the next-token loss of `batches` packed
    micro-batches drawn from `mixture`, the same packs an `sft` stage of that mixture would take.
    Keeps what the model already does while a preference or reward signal, which says nothing
    about the tasks it leaves out, or a new task's data moves the weights (train/loop.py)."""

    mixture: dict[str, float] = field(default_factory=dict)
    """Source name -> sampling weight of the replayed data (e.g. the SFT data and a text corpus)."""
    weight: float = 1.0
    """Weight of the replay loss (the mean token loss of the replayed targets) in the step's loss."""
    batches: int = 1
    """Replayed micro-batches per optimizer step."""
    token_budget: int | None = None
    """Tokens of each replayed micro-batch (None: the stage's token_budget). A smaller pack keeps
    e.g. a language share in every SFT step at a fraction of the step's cost."""

    def __post_init__(self):
        if not self.mixture or sum(self.mixture.values()) <= 0 or min(self.mixture.values()) < 0:
            raise ConfigError(f"replay.mixture needs at least one source with a weight > 0 (and none < 0), "
                              f"got {self.mixture}")
        if self.weight <= 0:
            raise ConfigError(f"replay.weight must be > 0, got {self.weight}")
        require_at_least(self, ("batches",), 1, "replay.")
        if self.token_budget is not None:
            require_at_least(self, ("token_budget",), 1, "replay.")


@dataclass
class Stage:
    """One training stage: which modules learn, from which data, for how long, and how."""

    name: str = "stage"
    """Shown in logs and in the checkpoint's stage history."""
    kind: StageKind = "sft"
    """What the stage optimises: sft (next-token loss over the supervised tokens: pretraining and
    fine-tuning alike), contrastive (image-caption pairs, SigLIP's sigmoid loss), dpo (preference
    pairs), grpo (RL with verifiable rewards). Each kind's settings are its own section below."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of the full weights of the modules the stage trains (their lr
    applies to the adapters); merged into the weights at the stage end, and saved in peft's format
    as DIR/adapters/<stage name>/. None: full fine-tuning."""
    contrastive: ContrastiveSettings = field(default_factory=ContrastiveSettings)
    """Settings of a `kind: contrastive` stage."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    """Settings of a `kind: dpo` stage."""
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    """Settings of a `kind: grpo` stage."""
    replay: ReplaySettings | None = None
    """Supervised data replayed beside the stage's own (None: none). In an `sft` stage its packs
    join every step, where a `mixture` source takes whole steps of its own (data/mixture.py)."""
    # --- what learns -------------------------------------------------------------------------
    vision_lr: float = 0.0
    """Peak learning rate of the vision encoder; 0 freezes it."""
    adapter_lr: float = 1e-3
    """Peak learning rate of the adapter; 0 freezes it."""
    llm_lr: float = 0.0
    """Peak learning rate of the LLM (embeddings, blocks, head); 0 freezes it."""
    frozen: list[str] = field(default_factory=list)
    """fnmatch patterns over full parameter names frozen in this stage whatever their module's lr:
    part of a module, e.g. one branch of DeepSeek-VL's hybrid tower (`vision.low_res.*`, the
    SigLIP branch; `vision.high_res.*`, the SAM branch) or the LLM's embeddings. A pattern that
    matches no parameter is an error."""
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
    divided by their total number of targets (weighted as `loss_weighting` says)."""
    loss_weighting: Literal["token", "square", "sample"] = "token"
    """How a step weighs its samples' supervised tokens (an sft stage's own data; its replay packs
    stay at token): token, every token once (the mean over the step's targets); square, each token
    of a sample with n targets 1/sqrt(n) (InternVL 2.5's square averaging: long answers no longer
    drown the short ones); sample, 1/n (every sample's mean loss counts once). The step minimises
    the weighted sum over the weighted number of targets (train/loop.py, `target_weights`), logged
    as `weighted_loss`; the logged `loss` stays the token mean."""
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
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon for the weights of the linear layers, AdamW for embeddings, the output
    head, norms, biases and convolutions (train/optim.py); the learning rates and weight decay
    mean the same under both."""
    muon_momentum: float = 0.95
    """optimizer muon: the momentum of Muon's updates (Nesterov)."""
    muon_lr_scale: float = 1.0
    """optimizer muon: the Muon matrices' peak learning rate as a multiple of their module's (the
    AdamW parameters keep the module's own). 1: Muon's update has AdamW's RMS; small models can
    take more (docs/training.md, "Optimizers")."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to matrices only, not to norms and biases)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 mixed precision: bf16 compute over fp32 master weights (train/precision.py; for
    GPUs: bf16 matmuls are slow on CPUs without bf16 instructions). A sharded run takes one for all stages."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """torch.compile each transformer block of the vision tower(s) and the LLM for this stage
    (models/compile.py): faster steps after a one-time compile per block kind; the losses equal
    the eager ones up to float rounding. Calls with a KV cache (generation) stay eager."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """The output head and its cross-entropy computed together, chunk by chunk, never holding the
    (tokens, vocabulary) logits (models/loss.py; Liger-Kernel's kernel on CUDA when installed):
    on, off, or auto = on for CUDA, off on the CPU (where the plain path is as fast)."""
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
        if self.kind == "contrastive":
            self._check_contrastive(where)
        elif not any(getattr(self, f"{m}_lr") > 0 for m in MODULES):
            raise ConfigError(f"{where}: every module is frozen (vision_lr, adapter_lr, llm_lr all 0)")
        require_at_least(self, ("steps", "token_budget", "grad_accum", "log_every", "keep_last", "step_every"), 1,
                         f"{where}: ")
        require_at_least(self, ("warmup_steps", "modality_warmup_steps", "eval_every", "save_every"), 0, f"{where}: ")
        if not 0.0 <= self.image_share_start <= 1.0:
            raise ConfigError(f"{where}: image_share_start must be in [0, 1], got {self.image_share_start}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"{where}: muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_lr_scale <= 0:
            raise ConfigError(f"{where}: muon_lr_scale must be > 0, got {self.muon_lr_scale}")
        if self.loss_weighting != "token" and self.kind != "sft":
            raise ConfigError(f"{where}: loss_weighting {self.loss_weighting!r} weighs an sft stage's supervised "
                              f"tokens; a {self.kind} stage has its own objective (leave loss_weighting: token)")
        if self.optimizer == "muon" and self.lora is not None:
            raise ConfigError(f"{where}: optimizer muon trains whole matrices; a LoRA stage trains low-rank "
                              "factors, which it leaves to AdamW (set optimizer: adamw)")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}: betas must be two numbers in [0, 1), got {list(self.betas)}")
        for src, w in self.mixture.items():
            if w < 0:
                raise ConfigError(f"{where}: mixture weight of {src!r} must be >= 0, got {w}")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ConfigError(f"{where}: mixture weights sum to 0")
        if self.replay is not None and not self.mixture:
            raise ConfigError(f"{where}: a stage with replay names its own sources in `mixture` (without one it "
                              "would read every source, the replayed ones too, as its own data)")
        if self.dpo.reference == "lora_disabled" and self.kind == "dpo" and self.lora is None:
            raise ConfigError(f"{where}: dpo.reference lora_disabled needs a `lora` section")

    def _check_contrastive(self, where: str) -> None:
        """The contrastive loss reaches the vision tower and the stage's heads only."""
        if self.adapter_lr > 0 or self.llm_lr > 0:
            raise ConfigError(f"{where}: a contrastive stage trains the vision tower and its heads only; set "
                              f"adapter_lr: 0 and llm_lr: 0 (got {self.adapter_lr}, {self.llm_lr})")
        if self.vision_lr <= 0 and self.contrastive.heads_lr <= 0:
            raise ConfigError(f"{where}: nothing to train: vision_lr and contrastive.heads_lr are both 0")

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
    """Stop when more than this fraction of records of a source cannot be used (counted, skipped),
    or when sources that became unreadable mid-run carried more than this share of a stage's
    mixture weight (train/data.py)."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (weights and optimizer untouched,
    logged as `skipped: nonfinite`); more than this many within `nonfinite_window` steps stops the
    run with an error, its last checkpoint intact."""
    nonfinite_window: int = 100
    """The span, in optimizer steps, over which skipped non-finite steps are counted."""
    save_retries: int = 2
    """A checkpoint that fails to write (full disk, permissions) is tried again this many times
    before the run stops with the error; earlier checkpoints stay intact either way."""
    save_retry_seconds: float = 10.0
    """Wait before each retry of a failed checkpoint write."""
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
            held_out = stage.dpo.eval_source if stage.kind == "dpo" else None
            if held_out is not None and held_out not in self.data:
                raise ConfigError(f"stages.{i}.dpo.eval_source: unknown source {held_out!r}; "
                                  f"data defines {sorted(self.data)}")
            if held_out is not None and not any(w > 0 for n, w in names.items() if n != held_out):
                raise ConfigError(f"stages.{i}: no training pairs besides the held-out dpo.eval_source {held_out!r}")
            unknown = sorted(set(stage.replay.mixture if stage.replay else {}) - set(self.data))
            if unknown:
                raise ConfigError(f"stages.{i}.replay.mixture: unknown source(s) {unknown}; "
                                  f"data defines {sorted(self.data)}")
            held_out = stage.contrastive.eval_source
            if stage.kind == "contrastive" and held_out is not None and held_out not in self.data:
                raise ConfigError(f"stages.{i}.contrastive.eval_source: unknown source {held_out!r}; "
                                  f"data defines {sorted(self.data)}")
        unknown = sorted(set(self.eval_sources) - set(self.data))
        if unknown:
            raise ConfigError(f"eval_sources: unknown source(s) {unknown}; data defines {sorted(self.data)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        require_at_least(self, ("num_threads", "max_nonfinite_steps", "save_retries"), 0)
        require_at_least(self, ("nonfinite_window",), 1)
        if self.save_retry_seconds < 0:
            raise ConfigError(f"save_retry_seconds must be >= 0, got {self.save_retry_seconds}")

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

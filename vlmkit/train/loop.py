"""The training loop: stages in order; per step, micro-batches -> forward / backward -> clip and
optimizer step -> metrics -> maybe eval -> maybe checkpoint.

Loss normalisation: a step's micro-batches hold different numbers of supervised targets, so the
step loss is  sum of token losses over all micro-batches (and ranks) / total targets  -- each
micro-batch backpropagates loss_sum / total_targets, never its own mean. With FSDP the gradients
are averaged over ranks, so each rank scales by the world size to keep the global sum. An sft
stage's `loss_weighting` (square, sample) first multiplies each sample's token losses by its
weight (`target_weights`) and divides by the weighted total instead.

Resume: `Trainer(..., resume=True)` continues from the newest complete checkpoint in
DIR/checkpoints/ and reaches bit for bit the weights the uninterrupted run would have (same
device, same thread count), wherever that checkpoint is: inside a stage (model, optimizer, step,
RNG states and data cursors are restored; the learning rate is a pure function of the step), at a
stage's end (the weights; the next stage starts from its seed as it always does), or after the
last stage (the weights, written again as DIR/final).

Faults (docs/reliability.md): a step whose loss or gradient norm is not finite on any rank is
skipped (gradients dropped, weights and optimizer untouched; the step and its data still count,
so resume stays exact) and logged as `skipped: nonfinite`; more than `max_nonfinite_steps` in
`nonfinite_window` steps stops the run. SIGTERM / SIGUSR1 (a cluster's preemption notice) make
the run write a checkpoint after the current step and raise `Preempted`. A checkpoint that fails
to write is tried again (`save_retries`) before the run stops; at resume a damaged newest
checkpoint is set aside for the one before it (train/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmkit import __version__
from vlmkit.api import VLM
from vlmkit.config import MODULES, RunConfig, Stage
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.native_images import with_sizing
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.types import Modality, PackedBatch
from vlmkit.data.world import TOKENIZER_DIR, prepare_world
from vlmkit.errors import CheckpointError, ConfigError, VlmkitError
from vlmkit.models.compile import compile_blocks
from vlmkit.models.config import VLMConfig
from vlmkit.models.lora import apply_lora, has_lora, merge_and_unload, save_adapter
from vlmkit.models.loss import fused_loss_wanted
from vlmkit.models.vlm import LossOutput
from vlmkit.models.weights import load_state
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.data import StageData, eval_batches
from vlmkit.train.distributed import (Dist, dcp_load_model, dcp_load_optimizer, dcp_save, full_state_dict,
                                     resharded, shard_model)
from vlmkit.train.contrastive import ContrastiveObjective
from vlmkit.train.dpo import DPOObjective
from vlmkit.train.grpo import GRPOObjective
from vlmkit.train.logging import MetricsLogger, plot_loss_curve
from vlmkit.train.objective import Objective
from vlmkit.train.precision import BF16, forward_precision, sharded_precision
from vlmkit.train.stages import apply_freezing, build_optimizer, set_lr, stage_seed

OBJECTIVES: dict[str, type[Objective]] = {"contrastive": ContrastiveObjective, "dpo": DPOObjective,
                                          "grpo": GRPOObjective}
"""The objective of each stage kind but `sft`, which is the trainer's own loop (train/objective.py)."""
ADAPTERS_DIR = "adapters"
"""DIR/adapters/<stage name>/: the LoRA adapter a LoRA stage trained, in peft's format."""

FINGERPRINT_MAX_BYTES = 64 << 20
"""Data files up to this size are fingerprinted by their bytes, larger ones by name and size
(reading a large shard set at every start would cost more than the check is worth)."""
MAX_PPL_LOSS = 50.0
"""Eval perplexity is exp(min(loss, MAX_PPL_LOSS)): a diverged loss reports a huge but finite
number instead of overflowing."""
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""How clusters announce preemption (Slurm's --signal, Kubernetes' pod termination): the run
writes a checkpoint after the current step and stops."""

log = logging.getLogger("vlmkit.train")


class Preempted(VlmkitError):
    """The run stopped on a preemption signal after writing a checkpoint; `--resume` continues it."""


class TooManyNonfiniteSteps(VlmkitError):
    """More steps than the run allows had a non-finite loss or gradient (RunConfig.max_nonfinite_steps)."""


class StopSignals:
    """While entered, PREEMPTION_SIGNALS only note their name in `received` (the trainer acts on it
    between steps); the previous handlers come back on exit. Python runs handlers in the main
    thread only, so elsewhere (a trainer in a worker thread) nothing is installed."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def build_model(cfg: RunConfig) -> VLM:
    """The model a run starts from, with its tokenizer when the source brings one."""
    spec = cfg.model
    tok_path = cfg.resolve(cfg.tokenizer.path)
    if tok_path is None and cfg.world is not None:
        tok_path = str(Path(cfg.world.dir).absolute() / TOKENIZER_DIR)
    tokenizer = Tokenizer.load(tok_path) if tok_path is not None else None
    if spec.kind == "config":
        model_cfg = dict(spec.config)
        if cfg.world is not None:  # the vocabulary is the world tokenizer's
            model_cfg["llm"] = {**model_cfg.get("llm", {}), "vocab_size": tokenizer.vocab_size}
            model_cfg["image_token_id"] = tokenizer.image_token_id
            if model_cfg.get("native_vision") is not None:
                model_cfg["video_token_id"] = tokenizer.video_token_id
        model = VLM(VLMConfig.from_dict(model_cfg))
    elif spec.kind == "pretrained":
        model = VLM.load(cfg.resolve(spec.pretrained))
    elif spec.kind == "hf_llava":
        model = VLM.from_hf_llava(cfg.resolve(spec.hf_llava))
    else:
        kwargs = {"adapter": spec.adapter} if spec.adapter is not None else {}
        model = VLM.from_hf(vision=cfg.resolve(spec.hf_vision), llm=cfg.resolve(spec.hf_llm), **kwargs)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if model.tokenizer is None:
        raise CheckpointError("no tokenizer: set tokenizer.path in the config (a model built from `config` has none)")
    if spec.processor is not None:
        if not model.config.is_native:
            raise ConfigError("model.processor sizes a native-resolution model's images (Qwen-VL family); "
                              "this model tiles them at a fixed size")
        model.processor_config = with_sizing(model.native_processor_config(), spec.processor)
    return model


def data_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """sha256 over each source's files (names, sizes, and the bytes of files up to
    FINGERPRINT_MAX_BYTES)."""
    out = {}
    for name, src in cfg.data.items():
        h = hashlib.sha256()
        path = Path(cfg.resolve(src.path))
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                continue
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            if size <= FINGERPRINT_MAX_BYTES:
                h.update(f.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out


def targets_per_sample(batch: PackedBatch) -> torch.Tensor:
    """Supervised targets of each sample: labels after the first position (the loss shifts
    within each sample, so a sample's first label is never predicted)."""
    valid = batch.labels != IGNORE_INDEX  # (T,)
    valid_cum = torch.cat([valid.new_zeros(1, dtype=torch.long), valid.long().cumsum(0)])  # (T+1,)
    starts, ends = batch.cu_seqlens[:-1].long(), batch.cu_seqlens[1:].long()
    return valid_cum[ends] - valid_cum[torch.clamp(starts + 1, max=ends)]  # (S,)


def target_weights(targets: torch.Tensor, weighting: str) -> torch.Tensor:
    """(S,) per sample, the weight of each of its supervised tokens in the step's loss
    (`Stage.loss_weighting`), from its number of targets n (`targets_per_sample`): 1 (token),
    1/sqrt(n) (square), 1/n (sample); 0 for a sample without targets."""
    if weighting == "token":
        return torch.ones(targets.shape, dtype=torch.float32)
    n = targets.double().clamp(min=1)
    weights = n.rsqrt() if weighting == "square" else n.reciprocal()
    return torch.where(targets > 0, weights, 0.0).float()


def weighted_loss_sum(batch: PackedBatch, out: LossOutput, weights: torch.Tensor) -> torch.Tensor:
    """The micro-batch's token losses summed, each times its sample's weight (`target_weights`)."""
    seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    per_position = torch.repeat_interleave(weights.to(out.token_loss.device), seqlens.to(out.token_loss.device))
    return (out.token_loss.float() * per_position).sum()


@dataclass
class StepSums:
    """What a step adds up over its micro-batches (then over ranks, `all_reduced`)."""

    loss_sum: float = 0.0
    """Summed token loss over the supervised targets."""
    tokens: int = 0
    """Tokens of the packs (no padding)."""
    budget: int = 0
    """Token budget of the packs (tokens / budget is the packing efficiency)."""
    source_loss: dict[str, float] = field(default_factory=dict)
    """Per data source, the summed token loss of its samples."""
    source_targets: dict[str, float] = field(default_factory=dict)
    """Per data source, the supervised targets of its samples."""
    weighted_loss_sum: float = 0.0
    """Summed token loss, each token times its sample's weight (`target_weights`)."""

    def add(self, batch: PackedBatch, out: LossOutput, targets: torch.Tensor,
            weighted: torch.Tensor | None = None) -> None:
        """Add a micro-batch: its loss output, `targets_per_sample(batch)` and its weighted loss
        sum (`weighted_loss_sum`; None: token weighting, the loss sum itself)."""
        self.loss_sum += float(out.loss_sum.detach())
        self.weighted_loss_sum += float((out.loss_sum if weighted is None else weighted).detach())
        self.tokens += batch.num_tokens
        self.budget += batch.budget
        cu = batch.cu_seqlens.tolist()
        token_loss = out.token_loss.detach().float().reshape(-1).cpu()
        for i, source in enumerate(batch.sources):
            self.source_loss[source] = self.source_loss.get(source, 0.0) + float(token_loss[cu[i]:cu[i + 1]].sum())
            self.source_targets[source] = self.source_targets.get(source, 0.0) + float(targets[i])

    def all_reduced(self, ctx: Dist, sources: list[str]) -> "StepSums":
        """The sums over every rank. `sources` names every data source of the run, the same list
        on every rank (a rank's step may hold no sample of some)."""
        local = {"loss_sum": self.loss_sum, "weighted_loss_sum": self.weighted_loss_sum, "tokens": self.tokens,
                 "budget": self.budget}
        for name in sources:
            local[f"loss/{name}"] = self.source_loss.get(name, 0.0)
            local[f"targets/{name}"] = self.source_targets.get(name, 0.0)
        total = ctx.all_reduce_named(local)
        return StepSums(loss_sum=total["loss_sum"], tokens=int(total["tokens"]), budget=int(total["budget"]),
                        source_loss={name: total[f"loss/{name}"] for name in sources},
                        source_targets={name: total[f"targets/{name}"] for name in sources},
                        weighted_loss_sum=total["weighted_loss_sum"])


@dataclass
class ForwardBackward:
    """What the forward and backward passes of a step give."""

    sums: StepSums
    """This rank's sums over its micro-batches."""
    targets: float
    """Supervised targets of the step over all micro-batches and ranks (at least 1)."""
    denominator: float
    """The loss's denominator: `targets`, or under a `loss_weighting` other than token the
    weighted number of targets (each sample's targets times its weight), over all micro-batches
    and ranks."""
    aux_loss: float
    """This rank's MoE auxiliary loss, the mean over its micro-batches (0 without MoE)."""


REPLAY_CURSOR = "replay"
"""The key of a stage's replayed data cursor inside a rank's data cursor (beside the objective's)."""


class Trainer:
    """Runs the stages of a RunConfig into an output directory."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, model: VLM | None = None, resume: bool = False,
                 ctx: Dist | None = None, meta: dict | None = None, on_stage_end=None):
        """`on_stage_end(index, model) -> dict` measures something at each stage end (e.g. a
        held-out score); its result goes into the stage history of the final checkpoint."""
        self.cfg = cfg
        self.on_stage_end = on_stage_end
        self.out = Path(out_dir)
        self.ctx = ctx or Dist.single()
        self.resume = resume
        self.extra_meta = meta or {}
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.world is not None and model is None:
            if self.ctx.is_main:
                prepare_world(cfg.world, progress=cfg.progress)
            self.ctx.barrier()
        if model is None:
            torch.manual_seed(cfg.seed)  # the same initial weights on every run (and rank)
            model = build_model(cfg)
        self.model = model
        self.tokenizer = self.model.tokenizer
        self.processor = self.model.image_processor()
        self.model.to(self.ctx.device)
        self.model.train()
        self.state = ckpt.TrainerState()
        self.fingerprint = data_fingerprint(cfg)
        self.sharded = False
        self.objective: Objective | None = None
        """The running stage's objective (None in an `sft` stage)."""
        self.heads: torch.nn.Module | None = None
        """The running stage's objective's own trained modules (train/objective.py)."""
        self.replay: StageData | None = None
        """The running stage's replayed supervised data (config.ReplaySettings; None: none)."""
        self.signals = StopSignals()

    # ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train every remaining stage; returns DIR/final (the checkpoint directory)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            ckpt.clean_temporaries(self.out)
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self.ctx.barrier()
        resume_from = self._resumable_checkpoint() if self.resume else None
        if resume_from is not None:
            self.state = ckpt.read_trainer_state(resume_from)
        elif not self.resume and ckpt.latest_checkpoint(self.out) is not None and self.ctx.is_main:
            raise CheckpointError(f"{self.out} already holds checkpoints of a run; pass --resume to continue "
                                  "it, or choose another --out")
        if self.ctx.is_distributed:
            self._check_distributable()
        # Only a checkpoint inside a stage carries an optimizer, data cursors and RNG to go on from.
        inside_stage = resume_from if resume_from is not None and self.state.step > 0 else None
        if inside_stage is not None:  # its LoRA adapters and heads exist before sharding and loading
            self._enter_stage(self.state.stage)
        if self.ctx.is_distributed:
            shard_model(self.model, self.ctx, sharded_precision(self.cfg.stages))
            self.sharded = True
        if resume_from is not None:
            # Whatever point the checkpoint marks (inside a stage, a stage's end, after the last
            # stage), the weights are the run's: even when no stage is left to run.
            self._load_weights(resume_from)
        if inside_stage is None and resume_from is not None:
            # At a stage's end: the next stage's surgery (LoRA's initialisation, an objective's
            # heads) draws from the RNG before the stage seeds it, as the uninterrupted run did.
            ckpt.restore_rng(resume_from, self.ctx.rank)
        self.logger = MetricsLogger(self.out, enabled=self.ctx.is_main, tensorboard=self.cfg.tensorboard,
                                    progress=self.cfg.progress, resume_step=self.state.global_step)
        try:
            with self.signals:
                for index in range(self.state.stage, len(self.cfg.stages)):
                    self._run_stage(index, inside_stage)
                    inside_stage = None
                    if self._stop_requested():  # the stage-end checkpoint is written
                        raise self._preempted()
        finally:
            self.logger.close()
        final = self._save_final()
        if self.ctx.is_main:
            plot_loss_curve(self.out)
        # The ranks leave together: a gloo rank that destroys its process group while rank 0 is
        # still at work (the plot) can abort at exit ("terminate called"), failing the torchrun job.
        self.ctx.barrier()
        return final

    # ------------------------------------------------------------------------------------------
    def _run_stage(self, index: int, resume_from: Path | None) -> None:
        """Run stage `index` from its start, or from `resume_from`, a checkpoint inside it."""
        stage = self.cfg.stages[index]
        optimizer, data = self._start_stage(index, resume_from)
        self.logger.start_stage(f"{index}:{stage.name}", stage.steps, self.state.step)
        last = {}
        while self.state.step < stage.steps:
            last = self._train_step(index, optimizer, data)
            self.state.step += 1
            self.state.global_step += 1
            step = self.state.step
            skipped = "skipped" in last
            if step % stage.log_every == 0 or step == stage.steps or skipped:
                self.logger.log(last)
            self.logger.advance(last)
            if skipped:
                self._count_nonfinite()
            if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
                self._eval(index)
            # The last step of a stage is followed by the stage-end checkpoint.
            stopping = step < stage.steps and self._stop_requested()
            if stopping or (stage.save_every and step % stage.save_every == 0 and step < stage.steps):
                self.state.data = self._gather_cursors(data)
                self._save(optimizer, stage.keep_last)
            if stopping:
                raise self._preempted()
        self.logger.close_bar()
        self._end_stage(index, last)

    def _check_distributable(self) -> None:
        """Refuse, before any work, the stages that run in one process only (the one home of that
        rule: the objectives rely on it)."""
        for stage in self.cfg.stages:
            if stage.kind == "contrastive":
                # Its heads (the text side) train outside FSDP: nothing would sum their gradients.
                raise ConfigError(f"stage {stage.name!r}: contrastive stages run in one process for now; run this "
                                  "config without torchrun")
        sharded_precision(self.cfg.stages)  # one precision for every stage (train/precision.py)

    def _enter_stage(self, index: int) -> None:
        """The model surgery a stage needs before its weights are trained or loaded: its LoRA
        adapters and its objective (with the objective's heads). A sharded model gets its adapters
        through an unsharded copy, sharded again (train/distributed.py)."""
        stage = self.cfg.stages[index]
        if stage.lora is not None and not has_lora(self.model):
            if self.sharded:
                self.model = resharded(self.model, self.ctx, lambda model: apply_lora(model, stage.lora),
                                       sharded_precision(self.cfg.stages))
            else:
                apply_lora(self.model, stage.lora)
        self.objective = OBJECTIVES[stage.kind](self, index) if stage.kind != "sft" else None
        self.heads = self.objective.heads() if self.objective is not None else None

    def _start_stage(self, index: int, resume_from: Path | None) -> tuple[torch.optim.Optimizer, StageData | Objective]:
        """Freeze, build the stage's optimizer and data; when `resume_from` (a checkpoint inside
        this stage) is given, restore the optimizer, this rank's data cursor and RNG from it."""
        cfg, stage, ctx = self.cfg, self.cfg.stages[index], self.ctx
        if resume_from is None:
            self._enter_stage(index)
        apply_freezing(self.model, stage)
        self.model.set_gradient_checkpointing(stage.gradient_checkpointing)
        compile_blocks(self.model, stage.compile)  # after sharding and LoRA: the blocks as they run
        self.model.fused_loss = fused_loss_wanted(stage.fused_loss, self.ctx.device)
        heads_lr = self.objective.heads_lr if self.objective is not None else 0.0
        optimizer = build_optimizer(self.model, stage, self.heads, heads_lr)
        if resume_from is None:
            # A stage starts from its seed; a run resumed inside a stage restores the RNG instead.
            torch.manual_seed(stage_seed(cfg, index))
        if self.objective is not None:
            data = self.objective
        else:
            data = StageData(cfg, index, self.tokenizer, self.processor, self.model.config.tokens_per_tile,
                             rank=ctx.rank, world=ctx.world)
        if stage.replay is not None:
            self.replay = StageData(cfg, index, self.tokenizer, self.processor, self.model.config.tokens_per_tile,
                                    rank=ctx.rank, world=ctx.world, mixture=stage.replay.mixture,
                                    token_budget=stage.replay.token_budget)
        if resume_from is None:
            self.state.stage, self.state.step, self.state.tokens = index, 0, 0
            return optimizer, data
        self._load_optimizer(resume_from, optimizer)
        if len(self.state.data) != ctx.world:  # each rank reads its own share of the data
            raise CheckpointError(f"{resume_from} was written by {len(self.state.data)} processes; resume it with "
                                  f"as many (this run has {ctx.world})")
        cursor = dict(self.state.data[str(ctx.rank)])
        replay_cursor = cursor.pop(REPLAY_CURSOR, None)
        data.load_state_dict(cursor)
        if self.replay is not None:
            self.replay.load_state_dict(replay_cursor)
        ckpt.restore_rng(resume_from, ctx.rank)  # last: the next draw is the next step's
        return optimizer, data

    def _end_stage(self, index: int, last: dict) -> None:
        """Eval, record the stage in the history, and save its weights for the hand-off."""
        stage = self.cfg.stages[index]
        evals = self._eval(index)
        if self.on_stage_end is not None:
            evals.update(self.on_stage_end(index, self.model) or {})
        self.state.history.append({"stage": stage.name, "kind": stage.kind, "steps": stage.steps,
                                   "tokens": self.state.tokens, "final_loss": last.get("loss"), "eval": evals,
                                   "trainable": {m: stage.lr_of(m) > 0 for m in MODULES},
                                   "lora": stage.lora is not None})
        self.state.stage, self.state.step, self.state.tokens, self.state.data = index + 1, 0, 0, {}
        self._leave_stage(index)
        self._save(None, stage.keep_last)  # stage end: weights for the hand-off, no optimizer

    def _leave_stage(self, index: int) -> None:
        """Save and merge the stage's LoRA adapters (the next stage and DIR/final get plain
        weights), and drop its objective. A sharded bf16 run hands the next stage freshly sharded
        units: FSDP2 fixes each unit's gradient dtype at its first forward from the parameters
        training then, so a unit this stage froze would give the next stage bf16 gradients for its
        fp32 shards (an error)."""
        stage = self.cfg.stages[index]
        if self.sharded:
            precision = sharded_precision(self.cfg.stages)
            if stage.lora is not None:
                self.model = resharded(self.model, self.ctx, lambda model: self._save_and_merge(model, stage),
                                       precision)
            elif precision == BF16 and index + 1 < len(self.cfg.stages):
                self.model = resharded(self.model, self.ctx, _unchanged, precision)
        elif stage.lora is not None:
            self._save_and_merge(self.model, stage)
        if self.objective is not None:
            self.objective.close()
        self.objective, self.heads, self.replay = None, None, None

    def _save_and_merge(self, model: VLM, stage: Stage) -> None:
        """Write a LoRA stage's adapter (DIR/adapters/<stage>), then fold it into the weights."""
        if self.ctx.is_main:
            save_adapter(model, self.out / ADAPTERS_DIR / stage.name)
        merge_and_unload(model)

    # ------------------------------------------------------------------------------------------
    def _train_step(self, index: int, optimizer: torch.optim.Optimizer, data: StageData | Objective) -> dict:
        """One optimizer step: gather micro-batches, forward / backward, optimizer step; returns
        the step's metrics record."""
        stage = self.cfg.stages[index]
        t0 = time.perf_counter()
        # the logged lr is the first module's (a Muon group's is muon_lr_scale times it)
        peak = next((g["peak_lr"] for g in optimizer.param_groups if not g.get("muon")),
                    optimizer.param_groups[0]["peak_lr"] / stage.muon_lr_scale)
        lr = peak * set_lr(optimizer, stage, self.state.step)
        if self.objective is not None:
            return self._objective_step(index, optimizer, lr, t0)
        modality = data.modality(self.state.step)
        batches = [data.next_batch(modality) for _ in range(stage.grad_accum)]
        passes = self._forward_backward(stage, batches, weighting=stage.loss_weighting)
        sums = passes.sums.all_reduced(self.ctx, sorted(self.cfg.data))
        replayed = ({} if self.replay is None else
                    self._replay_step(stage, {"loss": sums.loss_sum / passes.targets, "tokens": sums.tokens}))
        grad_norm, stepped = self._optimizer_step(optimizer, stage.grad_clip,
                                                  float(replayed.get("loss", sums.loss_sum)))
        seconds = time.perf_counter() - t0
        self.state.tokens += int(replayed.get("tokens", sums.tokens))
        self.state.wall_seconds += seconds
        record = self._step_record(index, modality, passes, sums, lr=lr, grad_norm=grad_norm, seconds=seconds)
        if replayed:  # the step's tokens and throughput count the replayed packs, as an objective step's do
            record.update(replayed, tokens_per_s=replayed["tokens"] / seconds)
        return record if stepped else {**record, "skipped": "nonfinite"}

    def _objective_step(self, index: int, optimizer: torch.optim.Optimizer, lr: float, t0: float) -> dict:
        """A step of a contrastive / dpo / grpo stage: the objective's passes, then the trainer's
        optimizer step."""
        metrics = self.objective.forward_backward(self.state.step)
        if self.replay is not None:
            metrics = self._replay_step(self.cfg.stages[index], metrics)
        grad_norm, stepped = self._optimizer_step(optimizer, self.cfg.stages[index].grad_clip, float(metrics["loss"]))
        seconds = time.perf_counter() - t0
        tokens = int(metrics.get("tokens", 0))
        self.state.tokens += tokens
        self.state.wall_seconds += seconds
        record = {"global_step": self.state.global_step + 1, "stage": index, "step": self.state.step + 1,
                  "kind": self.cfg.stages[index].kind, **metrics, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds, "step_seconds": seconds}
        return record if stepped else {**record, "skipped": "nonfinite"}

    def _replay_step(self, stage: Stage, metrics: dict) -> dict:
        """Backpropagate the step's replayed supervised micro-batches on top of the objective's
        gradients; the step's loss becomes the objective's plus the weighted replay loss."""
        modality = self.replay.modality(self.state.step)
        batches = [self.replay.next_batch(modality) for _ in range(stage.replay.batches)]
        passes = self._forward_backward(stage, batches, weight=stage.replay.weight)
        sums = passes.sums.all_reduced(self.ctx, [])
        replay_loss = sums.loss_sum / passes.targets
        return {**metrics, "loss": float(metrics["loss"]) + stage.replay.weight * replay_loss,
                "objective_loss": float(metrics["loss"]), "replay_loss": replay_loss, "replay_tokens": sums.tokens,
                "tokens": int(metrics.get("tokens", 0)) + sums.tokens}

    def _forward_backward(self, stage: Stage, batches: list[PackedBatch], *, weight: float = 1.0,
                          weighting: str = "token") -> ForwardBackward:
        """Backpropagate every micro-batch: its summed token loss over the step's targets (all
        micro-batches, all ranks; see the module docstring), times `weight`, plus its share of
        the MoE aux loss. Under a `weighting` other than token (`Stage.loss_weighting`) each
        token's loss is first multiplied by its sample's weight, and the sum is over the step's
        weighted targets."""
        per_sample = [targets_per_sample(b) for b in batches]
        sample_weights = [target_weights(t, weighting) for t in per_sample]
        counts = [float(sum(int(t.sum()) for t in per_sample)),
                  float(sum(float((t * w).sum()) for t, w in zip(per_sample, sample_weights)))]
        targets, weighted_targets = self.ctx.all_reduce_sum(counts)
        targets = max(targets, 1.0)
        denominator = targets if weighting == "token" else (weighted_targets or 1.0)
        # FSDP averages gradients over ranks: scaling by the world size keeps the global sum.
        loss_scale = weight * self.ctx.world / denominator
        sums, aux_loss = StepSums(), 0.0
        for batch, n_targets, weights in zip(batches, per_sample, sample_weights):
            with forward_precision(stage.precision, self.ctx.device):
                out = self._compute_loss(batch)
            weighted = None if weighting == "token" else weighted_loss_sum(batch, out, weights)
            objective = out.loss_sum if weighted is None else weighted
            (objective.float() * loss_scale + out.aux_loss.float() / len(batches)).backward()
            sums.add(batch, out, n_targets, weighted)
            aux_loss += float(out.aux_loss.detach()) / len(batches)
        return ForwardBackward(sums, targets, denominator, aux_loss)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, max_norm: float, loss: float) -> tuple[float, bool]:
        """Clip, step, zero the gradients, update the MoE router biases; returns (grad norm, whether
        it stepped). When the loss or the grad norm is not finite on any rank, every rank only
        drops the gradients: weights, optimizer state and router biases stay as they were."""
        grad_norm = self._clip(max_norm)
        (nonfinite,) = self.ctx.all_reduce_sum([0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0])
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            return grad_norm, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.model.llm.update_moe_bias()
        return grad_norm, True

    def _count_nonfinite(self) -> None:
        """Count the step just skipped for a non-finite loss or gradient; past
        `max_nonfinite_steps` of them within `nonfinite_window` steps, stop the run."""
        state, cfg = self.state, self.cfg
        state.nonfinite_total += 1
        state.nonfinite_steps = [s for s in state.nonfinite_steps if s > state.global_step - cfg.nonfinite_window]
        state.nonfinite_steps.append(state.global_step)
        if self.ctx.is_main:
            log.warning("step %d skipped: non-finite loss or gradient (%d in the last %d steps, %d allowed)",
                        state.global_step, len(state.nonfinite_steps), cfg.nonfinite_window, cfg.max_nonfinite_steps)
        if len(state.nonfinite_steps) > cfg.max_nonfinite_steps:
            latest = ckpt.latest_checkpoint(self.out)
            raise TooManyNonfiniteSteps(
                f"stopped at step {state.global_step}: {len(state.nonfinite_steps)} of the last {cfg.nonfinite_window} "
                f"steps had a non-finite loss or gradient (steps {state.nonfinite_steps}), more than "
                f"max_nonfinite_steps={cfg.max_nonfinite_steps}. Skipped steps change no weight; the last "
                f"checkpoint is {latest or 'none (none was written yet)'}. Lower the learning rate or check the "
                "data around these steps")

    def _stop_requested(self) -> bool:
        """Whether a preemption signal reached any rank (all ranks agree, so they stop together)."""
        (received,) = self.ctx.all_reduce_sum([1.0 if self.signals.received else 0.0])
        return received > 0

    def _preempted(self) -> Preempted:
        latest = ckpt.latest_checkpoint(self.out)
        return Preempted(f"stopped by {self.signals.received or 'a preemption signal on another rank'} after step "
                         f"{self.state.global_step}; checkpoint {latest} written, continue with --resume")

    def _step_record(self, index: int, modality: Modality, passes: ForwardBackward, sums: StepSums, *,
                     lr: float, grad_norm: float, seconds: float) -> dict:
        """The step's line of metrics.jsonl (DIR/metrics.jsonl, train/logging.py)."""
        record = {"global_step": self.state.global_step + 1, "stage": index, "step": self.state.step + 1,
                  "modality": modality, "loss": sums.loss_sum / passes.targets, "targets": int(passes.targets),
                  "lr": lr, "grad_norm": grad_norm, "tokens": sums.tokens, "tokens_per_s": sums.tokens / seconds,
                  "packing_efficiency": sums.tokens / sums.budget, "step_seconds": seconds}
        if self.cfg.stages[index].loss_weighting != "token":  # what the step minimised; `loss` stays the token mean
            record["weighted_loss"] = sums.weighted_loss_sum / passes.denominator
        if passes.aux_loss:
            record["aux_loss"] = passes.aux_loss
        for name, n in sums.source_targets.items():
            if n > 0:
                record[f"loss/{name}"] = sums.source_loss[name] / n
        for layer, load in self.model.llm.moe_load().items():
            record[f"moe_load_max/{layer}"] = max(load)
        return record

    def _compute_loss(self, batch: PackedBatch) -> LossOutput:
        return self.model.pack_loss(batch, self.ctx.device)

    def _clip(self, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (0: no clipping); returns their global norm (0 when no
        parameter got a gradient, e.g. a text step of a stage that trains the adapter only)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.heads is not None:
            params += [p for p in self.heads.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _eval(self, index: int) -> dict[str, float]:
        """Held-out loss (and perplexity) of each eval source, and the stage objective's own
        held-out metrics."""
        result = {}
        if self.objective is not None:
            self.model.eval()
            result.update(self.objective.evaluate())
            self.model.train()
        if not self.cfg.eval_sources:
            if result:
                self.logger.log({"global_step": self.state.global_step, "stage": index, "eval": True, **result})
            return result
        self.model.eval()
        stage = self.cfg.stages[index]
        for name in self.cfg.eval_sources:
            s, n = 0.0, 0.0
            for batch in eval_batches(self.cfg, name, self.tokenizer, self.processor, self.model.config.tokens_per_tile,
                                      stage.token_budget, rank=self.ctx.rank, world=self.ctx.world):
                # in the stage's precision: a sharded bf16 model's weights are bf16 in any forward
                with forward_precision(stage.precision, self.ctx.device):
                    out = self._compute_loss(batch)
                s += float(out.loss_sum)
                n += float(out.num_targets)
            s, n = self.ctx.all_reduce_sum([s, n])
            if n:
                result[f"eval_loss/{name}"] = s / n
                result[f"eval_ppl/{name}"] = math.exp(min(s / n, MAX_PPL_LOSS))
        self.model.train()
        self.logger.log({"global_step": self.state.global_step, "stage": index, "eval": True, **result})
        return result

    # ------------------------------------------------------------------------------------------
    def _gather_cursors(self, data: StageData | Objective) -> dict:
        cursor = data.state_dict()
        if self.replay is not None:
            cursor = {**cursor, REPLAY_CURSOR: self.replay.state_dict()}
        return {str(r): c for r, c in enumerate(self.ctx.all_gather_object(cursor))}

    def _resumable_checkpoint(self) -> Path | None:
        """The newest intact checkpoint (rank 0 checks the checksums, every rank gets its answer)."""
        found = str(ckpt.resumable_checkpoint(self.out) or "") if self.ctx.is_main else None
        found = self.ctx.broadcast_object(found)
        return Path(found) if found else None

    def _save(self, optimizer, keep_last: int) -> None:
        """A checkpoint of this point, tried again `save_retries` times when writing fails."""
        ckpt.retry_write(lambda: self._try_save(optimizer, keep_last), f"checkpoint step {self.state.global_step}",
                         retries=self.cfg.save_retries, wait_seconds=self.cfg.save_retry_seconds)

    def _try_save(self, optimizer, keep_last: int) -> str | None:
        """Write and commit a checkpoint; None, or why it failed (the same on every rank), its
        partial files removed."""
        if not self.sharded:
            try:
                ckpt.save_single(self.out, self.state, self.model, optimizer, keep_last, heads=self.heads)
            except OSError as e:
                return str(e)
            return None
        return self._try_save_sharded(optimizer, keep_last)

    def _try_save_sharded(self, optimizer, keep_last: int) -> str | None:
        """FSDP2: rank 0 picks the temp dir, every rank writes its shards and RNG, and rank 0
        commits only when every rank wrote its part."""
        # Deferred: DCP is slow to import (train/distributed.py) and only sharded runs get here.
        from torch.distributed.checkpoint.api import CheckpointException

        error, tmp = None, None
        if self.ctx.is_main:
            try:
                tmp = str(ckpt.new_temp_dir(self.out))
            except OSError as e:
                error = str(e)
        tmp = self.ctx.broadcast_object(tmp)
        if tmp is not None:
            try:
                dcp_save(Path(tmp) / "dcp", self.model, optimizer, self.heads)
                ckpt.write_trainer_files(Path(tmp), self.state, self.ctx.rank)
            except (OSError, CheckpointException) as e:
                error = str(e)
        (failed,) = self.ctx.all_reduce_sum([1.0 if error else 0.0])
        if self.ctx.is_main and tmp is not None:
            try:
                if failed:
                    raise OSError(error or "another rank could not write its part")
                ckpt.commit_checkpoint(Path(tmp), self.out, self.state.global_step, keep_last)
            except OSError as e:
                error = str(e)
                shutil.rmtree(tmp, ignore_errors=True)
        return self.ctx.broadcast_object(error)

    def _load_weights(self, path: Path) -> None:
        if self.sharded:
            dcp_load_model(path / "dcp", self.model, self.heads)
        else:
            ckpt.load_model_weights(path, self.model)
            if self.heads is not None:
                ckpt.load_heads(path, self.heads)

    def _load_optimizer(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        if self.sharded:
            dcp_load_optimizer(path / "dcp", self.model, optimizer)
        else:
            ckpt.load_optimizer(path, optimizer)

    def _save_final(self) -> Path:
        """DIR/final: a model directory (docs/architecture.md, "Checkpoint format"), written atomically."""
        final = self.out / "final"
        state = full_state_dict(self.model, self.ctx)
        if self.ctx.is_main:
            model = self.model
            if self.sharded:  # an unsharded copy for save_pretrained
                model = VLM(self.model.config)
                load_state(model, state, "the gathered weights of the sharded run")
                model.tokenizer = self.tokenizer
                model.processor_config = self.model.processor_config
            meta = {"version": __version__, "stages": self.state.history, "data_fingerprint": self.fingerprint,
                    "global_step": self.state.global_step, "train_wall_seconds": round(self.state.wall_seconds, 2),
                    **self.extra_meta}
            ckpt.retry_write(lambda: self._try_save_final(model, meta, final), str(final),
                             retries=self.cfg.save_retries, wait_seconds=self.cfg.save_retry_seconds)
        self.ctx.barrier()
        return final

    def _try_save_final(self, model: VLM, meta: dict, final: Path) -> str | None:
        """Write DIR/final; None, or why it failed (its partial files removed)."""
        tmp = None
        try:
            tmp = ckpt.new_temp_dir(self.out)
            model.save_pretrained(tmp, meta=meta)
            ckpt.commit_dir(tmp, final)
        except OSError as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return str(e)
        return None


def _unchanged(model: VLM) -> None:
    """The surgery that changes nothing: sharding a model afresh (`Trainer._leave_stage`)."""


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, model: VLM | None = None,
          meta: dict | None = None, on_stage_end=None) -> Path:
    """Train a run in this process (or as one rank of torchrun); returns DIR/final."""
    ctx = Dist.from_env()
    try:
        return Trainer(cfg, out_dir, model=model, resume=resume, ctx=ctx, meta=meta, on_stage_end=on_stage_end).run()
    finally:
        ctx.close()

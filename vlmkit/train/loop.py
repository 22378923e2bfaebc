"""The training loop: stages in order; per step, micro-batches -> loss -> backward -> clip ->
AdamW step -> log -> maybe eval -> maybe checkpoint.

Loss normalisation: a step's micro-batches hold different numbers of supervised targets, so the
step loss is  sum of token losses over all micro-batches (and ranks) / total targets  -- each
micro-batch backpropagates loss_sum / total_targets, never its own mean. With FSDP the gradients
are averaged over ranks, so each rank scales by the world size to keep the global sum.

Resume: `Trainer(..., resume=True)` continues from the newest complete checkpoint in
DIR/checkpoints/ and reaches bit for bit the weights the uninterrupted run would have (same
device, same thread count): model, optimizer, step, RNG states and data cursors are restored,
and the learning rate is a pure function of the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from vlmkit import __version__
from vlmkit.config import MODULES, RunConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.types import PackedBatch
from vlmkit.errors import CheckpointError
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.data import TOKENIZER_DIR, StageData, eval_batches, prepare_world
from vlmkit.train.distributed import Dist, dcp_load, dcp_save, full_state_dict, shard_model
from vlmkit.train.logging import MetricsLogger, plot_loss_curve
from vlmkit.train.stages import apply_freezing, build_optimizer, set_lr


def build_model(cfg: RunConfig):
    """The model a run starts from (api.VLM), with its tokenizer when the source brings one."""
    from vlmkit.api import VLM
    from vlmkit.models.config import VLMConfig

    from vlmkit.data.tokenizer import Tokenizer

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
        model = VLM(VLMConfig.from_dict(model_cfg))
    elif spec.kind == "pretrained":
        model = VLM.from_pretrained(cfg.resolve(spec.pretrained))
    elif spec.kind == "hf_llava":
        model = VLM.from_hf_llava(cfg.resolve(spec.hf_llava))
    else:
        kwargs = {"adapter": spec.adapter} if spec.adapter is not None else {}
        model = VLM.from_hf(vision=cfg.resolve(spec.hf_vision), llm=cfg.resolve(spec.hf_llm), **kwargs)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError("no tokenizer: set tokenizer.path in the config (a model built from `config` has none)")
    return model


def data_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """sha256 over each source's files (names, sizes, and the bytes of files up to 64 MiB)."""
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
            if size <= 64 << 20:
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


class Trainer:
    """Runs the stages of a RunConfig into an output directory."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, model=None, resume: bool = False,
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

    # ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train every remaining stage; returns DIR/final (the checkpoint directory)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            ckpt.clean_temporaries(self.out)
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self.ctx.barrier()
        resume_from = ckpt.latest_checkpoint(self.out) if self.resume else None
        if resume_from is not None:
            self.state = ckpt.read_trainer_state(resume_from)
        elif not self.resume and ckpt.latest_checkpoint(self.out) is not None and self.ctx.is_main:
            raise CheckpointError(f"{self.out} already holds checkpoints of a run; pass --resume to continue "
                                  "it, or choose another --out")
        if self.ctx.is_distributed:
            shard_model(self.model, self.ctx)
            self.sharded = True
        self.logger = MetricsLogger(self.out, enabled=self.ctx.is_main, tensorboard=self.cfg.tensorboard,
                                    progress=self.cfg.progress, resume_step=self.state.global_step)
        try:
            for index in range(self.state.stage, len(self.cfg.stages)):
                self._run_stage(index, resume_from if index == self.state.stage else None)
                resume_from = None
        finally:
            self.logger.close()
        final = self._save_final()
        if self.ctx.is_main:
            plot_loss_curve(self.out)
        return final

    # ------------------------------------------------------------------------------------------
    def _run_stage(self, index: int, resume_from: Path | None) -> None:
        cfg, stage, ctx = self.cfg, self.cfg.stages[index], self.ctx
        apply_freezing(self.model, stage)
        if hasattr(self.model, "set_gradient_checkpointing"):
            self.model.set_gradient_checkpointing(stage.gradient_checkpointing)
        optimizer = build_optimizer(self.model, stage)
        if resume_from is None or self.state.step == 0:
            # A stage starts from its seed; a resumed mid-stage run restores the RNG instead.
            torch.manual_seed(stage.seed * 1000 + index)
        data = StageData(cfg, index, self.tokenizer, self.processor, self.model.config.tokens_per_image,
                         rank=ctx.rank, world=ctx.world)
        if resume_from is not None:
            self._load(resume_from, optimizer if self.state.step > 0 else None)
            cursor = self.state.data.get(str(ctx.rank))
            if cursor:
                data.load_state_dict(cursor)
            if self.state.step > 0:
                ckpt.restore_rng(resume_from, ctx.rank)
        else:
            self.state.stage, self.state.step, self.state.tokens = index, 0, 0
        self.logger.start_stage(f"{index}:{stage.name}", stage.steps, self.state.step)
        last = {}
        while self.state.step < stage.steps:
            last = self._train_step(index, optimizer, data)
            self.state.step += 1
            self.state.global_step += 1
            step = self.state.step
            if step % stage.log_every == 0 or step == stage.steps:
                self.logger.log(last)
            self.logger.advance(last)
            if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
                self._eval(index)
            if stage.save_every and step % stage.save_every == 0 and step < stage.steps:
                self.state.data = self._gather_cursors(data)
                self._save(optimizer, stage.keep_last)
        self.logger.close_bar()
        evals = self._eval(index)
        if self.on_stage_end is not None:
            evals.update(self.on_stage_end(index, self.model) or {})
        self.state.history.append({"stage": stage.name, "steps": stage.steps, "tokens": self.state.tokens,
                                   "final_loss": last.get("loss"), "eval": evals,
                                   "trainable": {m: stage.lr_of(m) > 0 for m in MODULES}})
        self.state.stage, self.state.step, self.state.tokens, self.state.data = index + 1, 0, 0, {}
        self._save(None, stage.keep_last)  # stage end: weights for the hand-off, no optimizer

    # ------------------------------------------------------------------------------------------
    def _train_step(self, index: int, optimizer: torch.optim.Optimizer, data: StageData) -> dict:
        stage, ctx = self.cfg.stages[index], self.ctx
        t0 = time.perf_counter()
        lr_factor = set_lr(optimizer, stage, self.state.step)
        modality = data.modality(self.state.step)
        batches = [data.next_batch(modality) for _ in range(stage.grad_accum)]
        per_sample = [targets_per_sample(b) for b in batches]
        local_targets = float(sum(int(t.sum()) for t in per_sample))
        (total_targets,) = ctx.all_reduce_sum([local_targets])
        total_targets = max(total_targets, 1.0)
        autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if stage.precision == "bf16"
                    else nullcontext())
        loss_sum, aux_sum = 0.0, 0.0
        source_loss: dict[str, list[float]] = {}
        for batch, n_targets in zip(batches, per_sample):
            batch_dev = _to_device(batch, ctx.device)
            with autocast:
                out = self.model.compute_loss(batch_dev.input_ids, batch_dev.labels, batch_dev.position_ids,
                                              batch_dev.cu_seqlens, pixel_values=batch_dev.pixel_values)
            aux = out.aux_loss if torch.is_tensor(out.aux_loss) else torch.tensor(float(out.aux_loss or 0.0))
            scaled = out.loss_sum.float() * (ctx.world / total_targets) + aux.float() / stage.grad_accum
            scaled.backward()
            loss_sum += float(out.loss_sum.detach())
            aux_sum += float(aux.detach()) / stage.grad_accum
            _accumulate_sources(source_loss, batch, out.token_loss, n_targets)
        grad_norm = self._clip(stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        llm = getattr(self.model, "llm", None)
        if llm is not None and hasattr(llm, "update_moe_bias"):
            llm.update_moe_bias()
        tokens = sum(b.num_tokens for b in batches)
        budget = sum(b.budget for b in batches)
        names = sorted(self.cfg.data)
        reduced = ctx.all_reduce_sum([loss_sum, tokens, budget]
                                     + [source_loss.get(n, [0.0, 0.0])[k] for n in names for k in (0, 1)])
        g_loss, g_tokens, g_budget = reduced[:3]
        dt = time.perf_counter() - t0
        self.state.tokens += int(g_tokens)
        self.state.wall_seconds += dt
        record = {"global_step": self.state.global_step + 1, "stage": index, "step": self.state.step + 1,
                  "modality": modality, "loss": g_loss / total_targets, "targets": int(total_targets),
                  "lr": optimizer.param_groups[0]["peak_lr"] * lr_factor, "grad_norm": grad_norm,
                  "tokens": int(g_tokens), "tokens_per_s": g_tokens / dt,
                  "packing_efficiency": g_tokens / max(g_budget, 1.0), "step_seconds": dt}
        if aux_sum:
            record["aux_loss"] = aux_sum
        for i, name in enumerate(names):
            s, n = reduced[3 + 2 * i], reduced[4 + 2 * i]
            if n > 0:
                record[f"loss/{name}"] = s / n
        if llm is not None and hasattr(llm, "moe_load"):
            for layer, load in (llm.moe_load() or {}).items():
                record[f"moe_load_max/{layer}"] = max(load) if load else 0.0
        return record

    def _clip(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
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
        """Held-out loss (and perplexity) of each eval source."""
        if not self.cfg.eval_sources:
            return {}
        self.model.eval()
        result = {}
        for name in self.cfg.eval_sources:
            s, n = 0.0, 0.0
            for batch in eval_batches(self.cfg, name, self.tokenizer, self.processor, self.model.config.tokens_per_image,
                                      self.cfg.stages[index].token_budget, rank=self.ctx.rank, world=self.ctx.world):
                b = _to_device(batch, self.ctx.device)
                out = self.model.compute_loss(b.input_ids, b.labels, b.position_ids, b.cu_seqlens,
                                              pixel_values=b.pixel_values)
                s += float(out.loss_sum)
                n += float(out.num_targets)
            s, n = self.ctx.all_reduce_sum([s, n])
            if n:
                result[f"eval_loss/{name}"] = s / n
                result[f"eval_ppl/{name}"] = math.exp(min(s / n, 50.0))
        self.model.train()
        self.logger.log({"global_step": self.state.global_step, "stage": index, "eval": True, **result})
        return result

    # ------------------------------------------------------------------------------------------
    def _gather_cursors(self, data: StageData) -> dict:
        cursor = data.state_dict()
        if not self.ctx.is_distributed:
            return {"0": cursor}
        import torch.distributed as dist

        gathered = [None] * self.ctx.world
        dist.all_gather_object(gathered, cursor)
        return {str(r): c for r, c in enumerate(gathered)}

    def _save(self, optimizer, keep_last: int) -> None:
        if not self.sharded:
            ckpt.save_single(self.out, self.state, self.model, optimizer, keep_last)
            return
        # FSDP2: rank 0 picks the temp dir, every rank writes its shards and RNG, rank 0 commits.
        tmp = self.ctx.broadcast_object(str(ckpt.new_temp_dir(self.out)) if self.ctx.is_main else None)
        tmp = Path(tmp)
        dcp_save(tmp / "dcp", self.model, optimizer)
        ckpt.write_trainer_files(tmp, self.state, self.ctx.rank)
        self.ctx.barrier()
        if self.ctx.is_main:
            ckpt.commit_dir(tmp, ckpt.checkpoint_root(self.out) / f"step-{self.state.global_step:08d}")
            ckpt.prune(self.out, keep_last)
        self.ctx.barrier()

    def _load(self, path: Path, optimizer) -> None:
        if self.sharded:
            dcp_load(path / "dcp", self.model, optimizer)
            return
        ckpt.load_model_weights(path, self.model)
        if optimizer is not None:
            ckpt.load_optimizer(path, optimizer)

    def _save_final(self) -> Path:
        """DIR/final: the checkpoint format of DESIGN.md, written atomically."""
        final = self.out / "final"
        state = full_state_dict(self.model, self.ctx)
        if self.ctx.is_main:
            from vlmkit.api import VLM

            model = self.model
            if self.sharded:  # an unsharded copy for save_pretrained
                model = VLM(self.model.config)
                model.load_state_dict(state)
                model.tokenizer = self.tokenizer
            meta = {"version": __version__, "stages": self.state.history, "data_fingerprint": self.fingerprint,
                    "global_step": self.state.global_step, "train_wall_seconds": round(self.state.wall_seconds, 2),
                    **self.extra_meta}
            tmp = ckpt.new_temp_dir(self.out)
            model.save_pretrained(tmp, meta=meta)
            ckpt.commit_dir(tmp, final)
        self.ctx.barrier()
        return final


def _to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    if device.type == "cpu":
        return batch
    import dataclasses

    return dataclasses.replace(
        batch, input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
        position_ids=batch.position_ids.to(device), cu_seqlens=batch.cu_seqlens.to(device),
        pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(device))


def _accumulate_sources(acc: dict[str, list[float]], batch: PackedBatch, token_loss: torch.Tensor,
                        n_targets: torch.Tensor) -> None:
    """Add each sample's summed token loss and target count to its source's totals."""
    cu = batch.cu_seqlens.tolist()
    tl = token_loss.detach().float().reshape(-1).cpu()
    for i, source in enumerate(batch.sources):
        entry = acc.setdefault(source, [0.0, 0.0])
        entry[0] += float(tl[cu[i]:cu[i + 1]].sum())
        entry[1] += float(n_targets[i])


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, model=None, meta: dict | None = None,
          on_stage_end=None) -> Path:
    """Train a run in this process (or as one rank of torchrun); returns DIR/final."""
    ctx = Dist.from_env()
    try:
        return Trainer(cfg, out_dir, model=model, resume=resume, ctx=ctx, meta=meta, on_stage_end=on_stage_end).run()
    finally:
        if os.environ.get("WORLD_SIZE", "1") != "1":
            ctx.close()

"""DPO: a `kind: dpo` stage learns from pairs of a preferred and a rejected reply to one prompt.

The loss of a pair (Rafailov et al. 2023, the sigmoid form), with log-probs summed over each reply's
tokens, the policy's (pi) and a reference model's (ref):

    chosen_reward   = beta * (log pi(chosen) - log ref(chosen))
    rejected_reward = beta * (log pi(rejected) - log ref(rejected))
    loss            = -log sigmoid(chosen_reward - rejected_reward)

plus, with `sft_weight` w > 0, w times the chosen reply's mean next-token loss (RPO's added SFT
term). A step's loss is the mean over its pairs: all micro-batches, all ranks.

Data: each source of the stage's mixture is read as preference pairs (data/preference.py); each
micro-batch is one pack of `token_budget` tokens of whole pairs, chosen and rejected side by side,
each its own packed sample (no padding, no attention across them); the step takes `grad_accum`
packs, drawn from the sources by weight (data/mixture.py). Log-probs come from `VLM.pack_loss`'s
per-token loss (`sequence_logprobs`), the same forward every stage kind uses.

The reference (`dpo.reference`):
- copy: a frozen copy of the model as the stage starts. It rides in the stage's checkpoints as the
  objective's module (`heads`, never optimised), so a resumed stage compares with the stage's start
  model, not with the weights it resumes from. Under torchrun every rank holds the whole copy,
  gathered from the shards (train/distributed.py's `frozen_copy`): its forwards need no
  collectives.
- lora_disabled: the policy itself with its LoRA adapters switched off (models/lora.py), free: the
  base weights are frozen in a LoRA stage.
- precomputed: log-probs of every pair of this rank's share of the data (and of the held-out
  pairs), computed once by the start model at the first step, and kept with the data cursor
  (`state_dict`), so they survive a resume.

Metrics of each step: loss, reward_accuracy (share of pairs whose chosen reward is above the
rejected one), margin (chosen - rejected reward), chosen / rejected rewards and log-probs, pairs,
bad_pairs (pairs of the stage's sources skipped so far, by data/preference.py's reasons), tokens
and packing efficiency; with `dpo.eval_source`, held-out reward accuracy, margin and loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.mixture import Mixture, MixtureSource
from vlmkit.data.packing import SourceStream
from vlmkit.data.preference import PairPacker, PairPipeline, PreferenceBatch, read_pairs
from vlmkit.models import lora
from vlmkit.train.data import source_modality
from vlmkit.train.distributed import frozen_copy
from vlmkit.train.objective import Objective
from vlmkit.train.precision import forward_precision
from vlmkit.train.stages import stage_seed

PAIR_METRICS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
                "rejected_logp")
"""What each step reports as a mean over its pairs."""
EVAL_METRICS = {"reward_accuracy": "eval_reward_accuracy", "margin": "eval_margin", "loss": "eval_dpo_loss"}
"""The held-out metrics and their names in the eval record (`/<source>` appended)."""
FILE_ORDER = 1
"""A stream's shuffle block that keeps file order: the held-out packs are the same at every eval
point, and the precomputing pass reads each pair once."""


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def target_mask(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) whether each position's label is a scored target: supervised, and not the first token
    of its sample (nothing predicts it)."""
    mask = labels != IGNORE_INDEX
    mask[cu_seqlens[:-1].long()] = False
    return mask


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S,) the sum of `values` (T,) over each packed sample, differentiable. One slice per sample:
    the same order of additions on every device, so a resumed run repeats it bit for bit."""
    cu = cu_seqlens.tolist()
    return torch.stack([values[cu[i]:cu[i + 1]].sum() for i in range(len(cu) - 1)])


def sequence_logprobs(token_loss: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(S,) each packed sample's summed log-probability of its target tokens, from `pack_loss`'s
    (T,) per-token loss (the cross-entropy of each position's label); differentiable."""
    mask = target_mask(labels, cu_seqlens).to(token_loss.device)
    return segment_sums(torch.where(mask, -token_loss, 0.0), cu_seqlens)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The sigmoid DPO loss, the mean over pairs (module docstring), from (P,) summed log-probs of
    each pair's replies; and the pairs' mean rewards, margin, reward accuracy and log-probs."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (P,)
    rejected_reward = beta * (policy_rejected - ref_rejected)  # (P,)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    per_pair = {"reward_accuracy": (margin > 0).float(), "margin": margin, "chosen_reward": chosen_reward,
                "rejected_reward": rejected_reward, "chosen_logp": policy_chosen, "rejected_logp": policy_rejected}
    return loss, {name: float(value.detach().float().mean()) for name, value in per_pair.items()}


@dataclass
class PairSums:
    """Pair metrics summed over a step's packs (then over ranks): each mean weighted by its pairs."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    tokens: int = 0
    budget: int = 0

    def add(self, batch: PreferenceBatch, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * batch.num_pairs
        self.pairs += batch.num_pairs
        self.tokens += batch.num_tokens
        self.budget += batch.budget

    def all_reduced(self, ctx, extra: dict[str, float] | None = None) -> dict[str, float]:
        """The means over every rank's pairs, with pairs, tokens, packing efficiency and `extra`
        (counts summed over ranks). Every rank passes the same names."""
        extra = extra or {}
        total = ctx.all_reduce_named({**self.sums, **extra, "pairs": self.pairs, "tokens": self.tokens,
                                      "budget": self.budget})
        means = {name: total[name] / total["pairs"] for name in self.sums}
        return {**means, **{name: int(total[name]) for name in extra}, "pairs": int(total["pairs"]),
                "tokens": int(total["tokens"]), "packing_efficiency": total["tokens"] / total["budget"]}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class DPOObjective(Objective):
    """The data, reference and loss of a `kind: dpo` stage (module docstring)."""

    def __init__(self, trainer, index: int):
        super().__init__(trainer, index)
        self.settings = self.stage.dpo
        self.model = trainer.model
        # No-grad forwards run on derived weights once an engine enabled them (models/fused.py):
        # the reference's forward must run the policy's kernels, so that the two agree exactly
        # while their weights do (the first step's margins are 0).
        self.model.llm.fuse_projections(False)
        seed = stage_seed(trainer.cfg, index)
        weights = {name: weight for name, weight in trainer.cfg.stage_mixture(index).items()
                   if weight > 0 and name != self.settings.eval_source}
        self.training_sources = list(weights)
        self.mixture = Mixture([MixtureSource(name, self._packer(name, seed=seed), weight,
                                              source_modality(trainer.cfg.data[name]))
                                for name, weight in weights.items()], seed=seed)
        self.reference_model: nn.Module | None = None
        if self.settings.reference == "copy":
            self.reference_model = frozen_copy(self.model, trainer.ctx)
        self.table: dict[str, list[float]] | None = None
        """reference: precomputed -- pair key -> [chosen, rejected] reference log-probs."""

    def heads(self) -> nn.Module | None:
        """The frozen reference copy (reference: copy), so checkpoints inside the stage keep it
        (the trainer saves and restores an objective's modules; with heads_lr 0 it never trains)."""
        return self.reference_model

    def _packer(self, name: str, *, seed: int = 0, one_pass: bool = False) -> PairPacker:
        """A source's pairs for this rank, packed by the stage's token budget: an endless stream
        shuffled by `seed`, or with `one_pass` a single pass in file order."""
        cfg, ctx, budget = self.trainer.cfg, self.trainer.ctx, self.stage.token_budget
        src = cfg.data[name]
        path, root = cfg.resolve(src.path), cfg.resolve(src.root)
        order = {"loop": False, "shuffle_block": FILE_ORDER} if one_pass else {}
        stream = SourceStream(path, src.format, name=name, rank=ctx.rank, world=ctx.world, seed=seed, **order,
                              reader=lambda: read_pairs(path, src.format, root=root, source=name))
        processor = self.trainer.processor if source_modality(src) == "image" else None
        pipeline = PairPipeline(self.trainer.tokenizer, processor, self.model.config.tokens_per_tile,
                                max_length=budget, max_bad_fraction=cfg.max_bad_fraction, name=name)
        return PairPacker(stream, pipeline, budget)

    def _eval_packs(self) -> list[PreferenceBatch]:
        """The held-out source's first `eval_batches` packs, in file order (the same every time)."""
        packs = []
        for batch in self._packer(self.settings.eval_source, one_pass=True):
            packs.append(batch)
            if len(packs) >= self.trainer.cfg.eval_batches:
                break
        return packs

    def _autocast(self):
        return forward_precision(self.stage.precision, self.trainer.ctx.device)

    # ------------------------------------------------------------------------------------------
    def forward_backward(self, step: int) -> dict:
        """The step's packs: policy and reference log-probs, the loss (the mean over the step's
        pairs on every rank), backward."""
        ctx, settings = self.trainer.ctx, self.settings
        modality = self.mixture.modality(step)
        batches = [self.mixture.next_batch(modality) for _ in range(self.stage.grad_accum)]
        (pairs,) = ctx.all_reduce_sum([float(sum(b.num_pairs for b in batches))])
        # FSDP averages gradients over ranks: scaling by the world size keeps the mean over all pairs.
        loss_scale = ctx.world / pairs
        sums = PairSums()
        for batch in batches:
            with self._autocast():
                out = self.model.pack_loss(batch, ctx.device)
            policy = sequence_logprobs(out.token_loss, batch.cu_seqlens, batch.labels)  # (2P,)
            reference = self._reference_logps(batch)  # (2P,)
            loss, metrics = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], settings.beta)
            if settings.sft_weight > 0:
                sft = self._chosen_nll(policy, batch)
                metrics["sft_loss"] = float(sft.detach())
                loss = loss + settings.sft_weight * sft
            metrics["loss"] = float(loss.detach())
            (loss * batch.num_pairs * loss_scale + out.aux_loss.float() / self.stage.grad_accum).backward()
            sums.add(batch, metrics)
        bad = sum(source.packer.pipeline.stats.num_bad for source in self.mixture.sources)
        return sums.all_reduced(ctx, {"bad_pairs": bad})

    @staticmethod
    def _chosen_nll(policy: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        """The chosen replies' next-token loss: each reply's mean over its tokens, then the mean
        over the pairs."""
        targets = segment_sums(target_mask(batch.labels, batch.cu_seqlens).float(), batch.cu_seqlens)  # (2P,)
        return (-policy[0::2] / targets[0::2].to(policy.device)).mean()

    def _reference_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """(2P,) the reference's summed log-probs of the pack's samples."""
        if self.settings.reference != "precomputed":
            return self._forward_logps(batch)
        if self.table is None:  # the first step: the model is still the stage's start model
            self.table = self._precompute()
        return torch.tensor([v for key in batch.pair_keys for v in self.table[key]], device=self.trainer.ctx.device)

    def _forward_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """(2P,) summed log-probs of a pack's samples by the reference model (a no-grad forward)."""
        if self.settings.reference == "copy":
            model, view = self.reference_model, nullcontext()
        elif self.settings.reference == "lora_disabled":
            model, view = self.model, lora.lora_disabled(self.model)
        else:  # precomputing: the start model itself
            model, view = self.model, nullcontext()
        with torch.no_grad(), view, self._autocast():
            out = model.pack_loss(batch, self.trainer.ctx.device)
        return sequence_logprobs(out.token_loss, batch.cu_seqlens, batch.labels)

    def _precompute(self) -> dict[str, list[float]]:
        """Reference log-probs of every pair of this rank's share of the training sources and of
        the held-out packs, by the model as it is now."""
        packs = [batch for name in self.training_sources
                 for batch in self._packer(name, one_pass=True)]
        if self.settings.eval_source is not None:
            packs += self._eval_packs()
        table = {}
        for batch in packs:
            table.update(zip(batch.pair_keys, self._forward_logps(batch).float().view(-1, 2).tolist()))
        return table

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out reward accuracy, margin and DPO loss on `dpo.eval_source` (none without it)."""
        name = self.settings.eval_source
        if name is None:
            return {}
        sums = PairSums()
        for batch in self._eval_packs():
            out = self.model.pack_loss(batch, self.trainer.ctx.device)
            policy = sequence_logprobs(out.token_loss, batch.cu_seqlens, batch.labels)
            reference = self._reference_logps(batch)
            loss, metrics = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                     self.settings.beta)
            sums.add(batch, {**metrics, "loss": float(loss)})
        result = sums.all_reduced(self.trainer.ctx)
        return {f"{key}/{name}": result[metric] for metric, key in EVAL_METRICS.items()}

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "reference": self.table}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.table = state["reference"]

    def close(self) -> None:
        self.reference_model, self.table = None, None

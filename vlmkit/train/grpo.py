"""GRPO with verifiable rewards: the objective of a `kind: grpo` stage (train/objective.py).

A rollout: `prompts_per_step` prompts drawn from the stage's mixture sources (`PromptStream`),
each sampled `group_size` times by vlmkit's own engine (infer/engine.py) on the trainer's model
(eval mode, no grad), every reply scored by the reward router (train/rewards.py), and the rewards
normalised within each group into advantages, A = (r - mean) / (std + eps). Dynamic sampling
(DAPO) drops the groups whose rewards are all equal (no signal) and draws new prompts for them,
for at most `refill_rounds` more rounds. Each trainer step is then one optimizer step on the
rollout: its (prompt, reply) samples packed without padding (labels on the reply,
data/packing.py's `collate`), one forward per pack through `VLM.pack_loss`, whose per-token loss
gives log pi_theta of each reply token, and the clipped policy loss

    ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    loss    = 1/N sum_t [ -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A) + kl_coef k3_t ]

where N counts every reply token of the rollout over all ranks (DAPO's token-level average: a
token weighs the same in a long reply as in a short one), clip_high > clip_low is DAPO's
clip-higher, and k3_t = exp(r_t) - r_t - 1 with r_t = log pi_ref(y_t) - log pi_theta(y_t) is
Schulman's unbiased, non-negative KL estimator, as GRPO uses it. `updates_per_rollout` optimizer
steps reuse one rollout (1: fully on-policy); the pending rollout lives in the objective.

Log-probs. pi_old is what the engine reported while sampling (`SamplingParams.logprobs`: the
log-softmax of the raw logits, temperature 1) and pi_theta is the training forward's
`-token_loss`: the same quantity of the same weights (tests/test_grpo.py checks them equal within
1e-5 in float32), so the first update's ratio is 1. At a sampling temperature T != 1 the replies
come from softmax(logits / T), but the ratio and the KL are both taken at temperature 1, on the
policy itself rather than on its tempered sampling distribution. A bf16 stage's training forward
runs under autocast while the engine runs in the model's dtype; its ratios start near 1, not at it.

The reference of the KL (only kept when `kl_coef` > 0) is the stage's starting model: in a LoRA
stage the model with its adapters disabled (models/lora.py's `lora_disabled`), otherwise a frozen
copy, kept as the objective's `heads` so that checkpoints carry it and a resumed run gets the
stage start's weights back rather than the checkpoint's.

Under torchrun (FSDP2) every rank samples its own share of the prompts: a rank's decoding takes
as many steps as its replies need, which a sharded model cannot do (each forward gathers
parameters on every rank at once), so each rollout decodes on an unsharded copy of the policy,
gathered from the shards (train/distributed.py's `unsharded_copy`), which also computes a LoRA
stage's reference log-probs (adapters disabled); the frozen reference of a full-weight stage is such
a copy on every rank. The update runs on the sharded model, every rank padding its packs with
zero-weight passes to the same number of passes of each kind (`aligned_passes`); N and the
metrics are summed over the ranks.

Exact resume: the cursor holds the prompt stream (each source's position, the draw count, the bad
prompt counts) and a rollout with updates left (its prompts by source and position, replies, old
and reference log-probs, advantages, metrics). Every sequence samples with its own generator,
seeded from (stage seed, the prompt's draw number, its index in the group), so a resumed run draws
exactly the rollouts the uninterrupted one drew.

Bad input never stops a run: a record that asks nothing checkable or whose prompt leaves no room
for a reply in the context is a counted bad prompt (`bad_prompts`, by reason in the log, the run
stops only past `max_bad_fraction` as for any data); a reply cut at `max_new_tokens` or at the
context is counted (`overlong`); a checker that fails gives reward 0 and is counted
(`reward_errors`).

Logged per step: loss, reward, accuracy (the checkers' mean score), format_reward,
response_length (mean reply tokens), entropy (the mean of -log pi_old over the sampled tokens: a
one-sample estimate of the policy's per-token entropy at temperature 1), kl (with a reference),
clip_fraction, groups_kept, groups_dropped, reward_errors, overlong, bad_prompts (the stream's
total so far), tokens.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from vlmkit.api import VLM
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import BadRecord, Item
from vlmkit.data.packing import Position, SourceStream, collate
from vlmkit.data.pipeline import BadDataStats, describe, record_visuals
from vlmkit.data.prompt import Prompt, VisualInputs
from vlmkit.data.template import encode_prompt
from vlmkit.data.types import PackedBatch
from vlmkit.errors import BadRecordError, ConfigError
from vlmkit.infer.engine import Engine, Sequence
from vlmkit.infer.sampling import SamplingParams
from vlmkit.models import lora
from vlmkit.train.distributed import aligned_passes, frozen_copy, pass_kind, unsharded_copy
from vlmkit.train.objective import Objective
from vlmkit.train.precision import forward_precision
from vlmkit.train.rewards import Reward, RewardRouter, Task, task_from_record
from vlmkit.train.stages import stage_seed

ADVANTAGE_EPS = 1e-6
"""Added to a group's reward std before dividing (a group of equal rewards gets advantage 0)."""
MIN_PROMPTS_CHECKED = 100
"""Bad prompts stop the run past `max_bad_fraction` only after this many were drawn (as the SFT
pipeline's default)."""
BARREN_EPOCHS = 2
"""A source that gives no usable prompt for this many epoch starts stops the run (as the packer's
rule: the data, or the `categories` filter, leaves nothing to ask)."""


# ---------------------------------------------------------------------------------------------
# The loss, as pure functions
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(groups, G) rewards -> advantages (r - mean) / (std + ADVANTAGE_EPS) within each group. The
    std is the population one (over the G samples), so a group of one sample gets 0."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, correction=0)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                        clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with clip-higher: (loss, clipped), both shaped as `logp`.
    loss = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A); `clipped` marks the tokens
    where the clipped term is the smaller one (their gradient is 0)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_theta || pi_ref) per token: exp(r) - r - 1, r = ref - logp."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def sample_seed(seed: int, draw: int, sample: int) -> int:
    """The generator seed of sample `sample` of the prompt drawn `draw`-th in a stage of `seed`."""
    digest = hashlib.sha256(f"grpo:{seed}:{draw}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def runs_within(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of consecutive items grouped into runs of at most `budget` in total length (an item
    longer than the budget alone): the packs of a rollout, in its order."""
    runs: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if not runs or n > room:
            runs.append([])
            room = budget
        runs[-1].append(i)
        room -= n
    return runs


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptItem:
    """A drawn prompt, ready for the engine and for packing with a reply."""

    draw: int
    """Its number in the stage's stream of draws (seeds its samples)."""
    source: str
    position: Position
    """Where its record is in its source (how a resumed run finds it again)."""
    task: Task
    prompt: Prompt
    visual: VisualInputs


class PromptStream:
    """The prompts of a grpo stage: records of its mixture sources, a source drawn by weight from
    (stage seed, draw number), each record's share read by this rank (data/packing.py's
    `SourceStream`), turned into a prompt and a task (train/rewards.py's `task_from_record`)."""

    def __init__(self, trainer, index: int):
        cfg = trainer.cfg
        self.seed = stage_seed(cfg, index)
        self.tokenizer, self.processor = trainer.tokenizer, trainer.processor
        self.tokens_per_tile = trainer.model.config.tokens_per_tile
        self.context = trainer.model.config.llm.max_position_embeddings
        self.max_bad_fraction = cfg.max_bad_fraction
        self.weights = {name: w for name, w in cfg.stage_mixture(index).items() if w > 0}
        self.streams = {name: SourceStream(cfg.resolve(cfg.data[name].path), cfg.data[name].format,
                                           root=cfg.resolve(cfg.data[name].root), kind=cfg.data[name].kind,
                                           name=name, rank=trainer.ctx.rank, world=trainer.ctx.world,
                                           seed=self.seed)
                        for name in self.weights}
        self.categories = trainer.cfg.stages[index].grpo.categories
        self.stats = BadDataStats("grpo prompts")
        self.draws = 0
        self._usable_epoch: dict[str, int] = {}  # per source, the epoch of its last usable prompt
        self.next_pos: dict[str, Position] = {name: (0, 0) for name in self.weights}
        self._items: dict[str, object] = {}

    def next(self) -> PromptItem:
        """The next usable prompt of the wanted categories (unusable records are counted and
        skipped, records of other categories skipped)."""
        while True:
            name = self._pick()
            if name not in self._items:
                self._items[name] = self.streams[name].iter_from(self.next_pos[name])
            pos, item = next(self._items[name])
            self.next_pos[name] = (pos[0], pos[1] + 1)
            self.draws += 1
            prompt = self._counted(name, pos, item)
            if prompt is not None:
                self._usable_epoch[name] = pos[0]
                return prompt
            if pos[0] >= self._usable_epoch.get(name, 0) + BARREN_EPOCHS:
                raise ConfigError(f"grpo: source {name!r} went through a whole epoch without a usable prompt"
                                  + (f" of the categories {self.categories}" if self.categories else ""))

    def _counted(self, name: str, pos: Position, item: Item) -> PromptItem | None:
        """`item` as the prompt of the current draw; None for a record of another category, or
        an unusable one (counted by reason; too many stop the run)."""
        try:
            prompt = self._build(self.draws - 1, name, pos, item)
        except BadRecordError as e:
            self.stats.seen += 1
            self.stats.add_bad(e.reason, str(item) if isinstance(item, BadRecord) else describe(item, e))
            self.stats.check(self.max_bad_fraction, MIN_PROMPTS_CHECKED)
            return None
        if self.categories is not None and prompt.task.category not in self.categories:
            return None
        self.stats.seen += 1
        self.stats.ok += 1
        return prompt

    def at(self, name: str, position: Position, draw: int) -> PromptItem:
        """The prompt drawn `draw`-th, from `position` of source `name` (a resumed rollout's)."""
        pos, item = next(self.streams[name].iter_from(position))
        return self._build(draw, name, pos, item)

    def _pick(self) -> str:
        names = list(self.weights)
        if len(names) == 1:
            return names[0]
        rng = random.Random(f"{self.seed}:grpo-source:{self.draws}")
        return rng.choices(names, weights=[self.weights[n] for n in names])[0]

    def _build(self, draw: int, name: str, pos: Position, item: Item) -> PromptItem:
        if isinstance(item, BadRecord):
            raise BadRecordError(item.reason, item.message, item.record_id)
        turns, task = task_from_record(item)
        visual = record_visuals(item, self.processor, self.tokens_per_tile)
        ids = encode_prompt(turns, self.tokenizer, visual.visual_tokens, visual.video_tokens)
        if len(ids) >= self.context:
            raise BadRecordError("too_long", f"a prompt of {len(ids)} tokens leaves no room for a reply in the "
                                 f"model's context of {self.context}", item.id)
        prompt = Prompt(ids, visual.pixel_values, visual.grid_thw, visual.pixel_values_videos, visual.video_grid_thw,
                        visual.second_per_grid_ts)
        return PromptItem(draw, name, pos, task, prompt, visual)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "next": {n: list(p) for n, p in self.next_pos.items()},
                "bad": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(state["next"]) ^ set(self.weights))
        if missing:
            raise ConfigError(f"grpo prompt cursor does not match the stage's sources: {missing} differ")
        self.draws = int(state["draws"])
        self.next_pos = {n: (int(p[0]), int(p[1])) for n, p in state["next"].items()}
        self.stats.load_state_dict(state["bad"])
        self._items = {}


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One sampled reply and its reward."""

    ids: list[int]
    """The sampled tokens, the end-of-turn token included when it ended on one."""
    logprobs: list[float]
    """The engine's log-prob of each (pi_old)."""
    reward: Reward
    overlong: bool
    """Cut at max_new_tokens or at the context."""
    visual_cut: bool
    """Ended by a sampled image or video token, which is not part of `ids` (`GRPOObjective._reply`)."""


@dataclass
class RolloutSample:
    """A kept (prompt, reply) sample with what its update needs."""

    prompt: int
    """Index into the rollout's prompts."""
    reply_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    ref_logprobs: list[float] | None = None


@dataclass
class Rollout:
    """A rollout's kept samples, its metrics, and how many updates used it."""

    prompts: list[PromptItem]
    samples: list[RolloutSample]
    metrics: dict[str, float]
    updates: int = 0

    def state_dict(self) -> dict:
        return {"prompts": [[p.source, *p.position, p.draw] for p in self.prompts],
                "samples": [[s.prompt, s.reply_ids, s.old_logprobs, s.advantage, s.ref_logprobs] for s in self.samples],
                "metrics": self.metrics, "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict, stream: PromptStream) -> "Rollout":
        prompts = [stream.at(name, (int(epoch), int(index)), int(draw)) for name, epoch, index, draw in state["prompts"]]
        samples = [RolloutSample(*s) for s in state["samples"]]
        return cls(prompts, samples, dict(state["metrics"]), int(state["updates"]))


@dataclass
class PackTargets:
    """Per-token inputs of the loss over one pack, (T,) each (0 outside the replies)."""

    reply: torch.Tensor
    """1.0 at reply tokens."""
    old_logp: torch.Tensor
    advantage: torch.Tensor
    ref_logp: torch.Tensor | None


@dataclass
class RolloutSums:
    """What a rollout adds up over its sampled replies (all groups, kept or dropped)."""

    replies: int = 0
    reward: float = 0.0
    correct: float = 0.0
    format: float = 0.0
    reply_tokens: int = 0
    neg_logprob: float = 0.0
    reward_errors: int = 0
    overlong: int = 0
    visual_cuts: int = 0
    groups_kept: int = 0
    groups_dropped: int = 0

    def add(self, group: list[Reply]) -> None:
        for reply in group:
            self.replies += 1
            self.reward += reply.reward.total
            self.correct += reply.reward.correct
            self.format += reply.reward.format
            self.reply_tokens += len(reply.ids)
            self.neg_logprob -= sum(reply.logprobs)
            self.reward_errors += int(reply.reward.error)
            self.overlong += int(reply.overlong)
            self.visual_cuts += int(reply.visual_cut)

    def metrics(self, ctx) -> dict[str, float]:
        """The rollout's logged metrics, over every rank."""
        total = ctx.all_reduce_named({k: float(getattr(self, k)) for k in (
            "replies", "reward", "correct", "format", "reply_tokens", "neg_logprob", "reward_errors", "overlong",
            "visual_cuts", "groups_kept", "groups_dropped")})
        replies, tokens = max(total["replies"], 1.0), max(total["reply_tokens"], 1.0)
        return {"reward": total["reward"] / replies, "accuracy": total["correct"] / replies,
                "format_reward": total["format"] / replies, "response_length": total["reply_tokens"] / replies,
                "entropy": total["neg_logprob"] / tokens, "reward_errors": int(total["reward_errors"]),
                "overlong": int(total["overlong"]), "visual_cuts": int(total["visual_cuts"]),
                "groups_kept": int(total["groups_kept"]),
                "groups_dropped": int(total["groups_dropped"])}


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


class GRPOObjective(Objective):
    """Rollouts, rewards, advantages and the clipped token-level policy loss (module docstring)."""

    def __init__(self, trainer, index: int):
        super().__init__(trainer, index)
        self.settings = self.stage.grpo
        self.model = trainer.model
        self.prompts = PromptStream(trainer, index)
        self.router = RewardRouter(self.settings)
        self.pending: Rollout | None = None
        config = self.model.config
        self.visual_ids = frozenset(i for i in (config.image_token_id, config.video_token_id) if i is not None)
        """Token ids a reply may not contain (`_reply`)."""
        self.reference = None
        if self.settings.kl_coef > 0 and self.stage.lora is None:
            self.reference = frozen_copy(self.model, trainer.ctx)
            self.reference.llm.fuse_projections(False)  # the policy's kernels, whatever the model decoded with

    def heads(self):
        # The frozen reference rides with the checkpoints (module docstring); its lr is 0.
        return self.reference

    # ---- a step --------------------------------------------------------------------------------

    def forward_backward(self, step: int) -> dict:
        if self.pending is None:
            self.pending = self._rollout()
        metrics = {**self.pending.metrics, **self._update(self.pending)}
        self.pending.updates += 1
        if self.pending.updates >= self.settings.updates_per_rollout:
            self.pending = None
        (bad,) = self.trainer.ctx.all_reduce_sum([float(self.prompts.stats.num_bad)])
        return {**metrics, "bad_prompts": int(bad)}

    def _rollout(self) -> Rollout:
        """Sample, score and keep groups until the batch is full or the refill rounds are used."""
        s = self.settings
        kept: list[tuple[PromptItem, list[Reply]]] = []
        sums = RolloutSums()
        policy = self._rollout_policy()
        rounds = 1 + (s.refill_rounds if s.dynamic_sampling else 0)
        for _ in range(rounds):
            if len(kept) >= s.prompts_per_step:
                break
            drawn = [self.prompts.next() for _ in range(s.prompts_per_step - len(kept))]
            for prompt, group in zip(drawn, self._sample(drawn, policy)):
                sums.add(group)
                if s.dynamic_sampling and len({reply.reward.total for reply in group}) == 1:
                    sums.groups_dropped += 1
                else:
                    kept.append((prompt, group))
        sums.groups_kept = len(kept)
        samples = []
        if kept:
            rewards = torch.tensor([[reply.reward.total for reply in group] for _, group in kept])
            advantages = group_advantages(rewards).tolist()
            samples = [RolloutSample(i, reply.ids, reply.logprobs, advantages[i][k])
                       for i, (_, group) in enumerate(kept) for k, reply in enumerate(group)]
        rollout = Rollout([prompt for prompt, _ in kept], samples, sums.metrics(self.trainer.ctx))
        if s.kl_coef > 0:
            self._add_reference_logprobs(rollout, policy)
        return rollout

    def _rollout_policy(self) -> VLM:
        """The model a rollout decodes with: the policy itself, or under FSDP its unsharded copy
        (module docstring), gathered by every rank at once."""
        return unsharded_copy(self.model, self.trainer.ctx) if self.trainer.sharded else self.model

    @torch.no_grad()
    def _sample(self, drawn: list[PromptItem], policy: VLM) -> list[list[Reply]]:
        """`group_size` replies to each prompt, all decoded in one batch by the engine on `policy`."""
        s = self.settings
        was_training = policy.training
        policy.eval()
        try:
            engine = Engine(policy, self.trainer.tokenizer)
            seqs: list[Sequence] = []
            for prompt in drawn:
                room = self.prompts.context - len(prompt.prompt.input_ids)
                for k in range(s.group_size):
                    params = SamplingParams(max_new_tokens=min(s.max_new_tokens, room), temperature=s.temperature,
                                            seed=sample_seed(self.prompts.seed, prompt.draw, k), logprobs=True,
                                            stop_token_ids=sorted(self.visual_ids))
                    seqs.append(engine.add(prompt.prompt, params))
            while engine.rows:
                engine.step()
                for seq in [seq for seq in engine.rows if seq.finished]:
                    engine.remove(seq)
        finally:
            # The engine decodes on copies of the weights derived for decoding (models/fused.py);
            # they are stale after the next optimizer step anyway, and without them the rest of the
            # stage (the reference's and the held-out forwards) runs the model's own kernels.
            policy.llm.fuse_projections(False)
            policy.train(was_training)
        return [[self._reply(seq, prompt.task) for seq in seqs[i * s.group_size:(i + 1) * s.group_size]]
                for i, prompt in enumerate(drawn)]

    def _reply(self, seq: Sequence, task: Task) -> Reply:
        """A finished sequence as a scored reply. A sampled image or video token ends the reply
        before it: a visual token in the text would ask the training forward for an image it
        does not have, so it is neither kept nor trained on."""
        ids, logprobs = seq.output_ids, seq.output_logprobs
        visual_cut = bool(ids) and ids[-1] in self.visual_ids
        if visual_cut:
            ids, logprobs = ids[:-1], logprobs[:-1]
        complete = seq.finish_reason == "stop" and not visual_cut
        return Reply(ids, logprobs, self.router.score(seq.take_delta(), task, complete),
                     overlong=seq.finish_reason == "length", visual_cut=visual_cut)

    # ---- the loss ------------------------------------------------------------------------------

    def _packs(self, rollout: Rollout) -> list[tuple[PackedBatch, PackTargets]]:
        """The rollout's samples packed in order within the stage's token budget, each pack with
        its per-token targets of the loss."""
        lengths = [len(rollout.prompts[s.prompt].prompt.input_ids) + len(s.reply_ids) for s in rollout.samples]
        packs = []
        for run in runs_within(lengths, self.stage.token_budget):
            samples, reply, old, adv, ref = [], [], [], [], []
            for i in run:
                sample = rollout.samples[i]
                prompt = rollout.prompts[sample.prompt]
                prompt_ids, n = prompt.prompt.input_ids, len(sample.reply_ids)
                samples.append(prompt.visual.sample(f"{prompt.task.id}#{i}", prompt.source,
                                                    prompt_ids + sample.reply_ids,
                                                    [IGNORE_INDEX] * len(prompt_ids) + sample.reply_ids))
                pad = [0.0] * len(prompt_ids)
                reply += pad + [1.0] * n
                old += pad + sample.old_logprobs
                adv += pad + [sample.advantage] * n
                ref += pad + (sample.ref_logprobs or [0.0] * n)
            targets = PackTargets(torch.tensor(reply), torch.tensor(old), torch.tensor(adv),
                                  torch.tensor(ref) if rollout.samples[run[0]].ref_logprobs is not None else None)
            packs.append((collate(samples, self.stage.token_budget), targets))
        return packs

    @torch.no_grad()
    def _add_reference_logprobs(self, rollout: Rollout, policy: VLM) -> None:
        """Each kept sample's reply log-probs under the reference (module docstring); in a LoRA
        stage, `policy` (the rollout's model) with its adapters disabled."""
        reference = self.reference if self.reference is not None else policy
        disabled = lora.lora_disabled(policy) if self.reference is None else nullcontext()
        was_training = reference.training
        reference.eval()
        i = 0
        try:
            with disabled:
                for batch, targets in self._packs(rollout):
                    logp = -reference.pack_loss(batch, self.trainer.ctx.device).token_loss.float().cpu()
                    reply = targets.reply.bool()
                    for start, end in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
                        rollout.samples[i].ref_logprobs = logp[start:end][reply[start:end]].tolist()
                        i += 1
        finally:
            reference.train(was_training)

    def _update(self, rollout: Rollout) -> dict[str, float]:
        """Backpropagate the loss over the whole rollout (one optimizer step's gradients)."""
        s, ctx, device = self.settings, self.trainer.ctx, self.trainer.ctx.device
        packs = self._packs(rollout)
        (n_tokens,) = ctx.all_reduce_sum([float(sum(len(x.reply_ids) for x in rollout.samples))])
        # FSDP would average gradients over ranks: scaling by the world size keeps the global sum.
        scale = ctx.world / max(n_tokens, 1.0)
        autocast = forward_precision(self.stage.precision, device)
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0}
        for (batch, targets), real in aligned_passes(packs, ctx, lambda pack: pass_kind(pack[0])):
            if not real:  # FSDP's padding pass (train/distributed.py): gathers and adds nothing
                with autocast:
                    out = self.model.pack_loss(batch, device)
                (out.loss_sum.float() * 0.0 + out.aux_loss.float() * 0.0).backward()
                continue
            with autocast:
                out = self.model.pack_loss(batch, device)
            reply = targets.reply.to(device)
            logp = -out.token_loss
            loss_t, clipped = clipped_policy_loss(logp, targets.old_logp.to(device), targets.advantage.to(device),
                                                  s.clip_low, s.clip_high)
            if targets.ref_logp is not None:
                kl_t = kl_estimate(logp, targets.ref_logp.to(device))
                loss_t = loss_t + s.kl_coef * kl_t
                sums["kl"] += float((kl_t.detach() * reply).sum())
            loss = (loss_t * reply).sum()
            (loss * scale + out.aux_loss.float() / len(packs)).backward()
            sums["loss"] += float(loss.detach())
            sums["clipped"] += float((clipped.float() * reply).sum())
            sums["tokens"] += batch.num_tokens
        total = ctx.all_reduce_named(sums)
        n = max(n_tokens, 1.0)
        metrics = {"loss": total["loss"] / n, "clip_fraction": total["clipped"] / n, "tokens": int(total["tokens"])}
        if s.kl_coef > 0:
            metrics["kl"] = total["kl"] / n
        return metrics

    # ---- cursor --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(),
                "pending": self.pending.state_dict() if self.pending is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        pending = state.get("pending")
        self.pending = Rollout.from_state(pending, self.prompts) if pending is not None else None

    def close(self) -> None:
        self.reference = None

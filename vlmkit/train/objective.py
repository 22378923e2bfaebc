"""What a stage of a kind other than `sft` plugs into the trainer (train/loop.py).

An `sft` stage is the trainer's own loop: packed micro-batches, the summed token loss over the
step's targets. The other kinds (contrastive, dpo, grpo) each bring an `Objective`: the trainer
still owns the stage's freezing, optimizer, learning-rate schedule, clipping, logging and
checkpoints; the objective owns the stage's data and its forward / backward pass. That split
keeps one home for everything a stage shares (resume, FSDP, metrics), whatever it optimises.

An objective may train modules of its own besides the model's (`heads`: e.g. the text side of a
contrastive stage); they are optimised at the objective's `heads_lr`, checkpointed with the
model (DIR/checkpoints/*/heads.safetensors) and dropped at the stage end.
"""

from __future__ import annotations

from torch import nn

from vlmkit.config import Stage


class Objective:
    """The data and loss of one stage. Subclasses implement `forward_backward` and the data
    cursor (`state_dict` / `load_state_dict`); the rest has working defaults."""

    heads_lr: float = 0.0
    """Peak learning rate of `heads` (the schedule of the stage applies to it too)."""

    def __init__(self, trainer, index: int):
        """`trainer`: the train/loop.py Trainer running the stage (its model, tokenizer, image
        processor, config, process context `ctx` and output directory `out`). Not imported for
        the annotation: the trainer imports the objectives."""
        self.trainer = trainer
        self.index = index
        self.stage: Stage = trainer.cfg.stages[index]

    def heads(self) -> nn.Module | None:
        """Modules this stage trains besides the model's (None: none). Built in `__init__`,
        before a resumed run loads its checkpoint into them."""
        return None

    def forward_backward(self, step: int) -> dict:
        """Gather this step's data, run the forward passes and backpropagate (the trainer then
        clips and steps). Returns the step's metrics; `loss` is required, and `tokens` (tokens
        of the step's forward passes, summed over ranks) feeds the run's token count."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at the stage end (and at `eval_every` points), e.g. retrieval accuracy."""
        return {}

    def state_dict(self) -> dict:
        """This rank's data cursor (JSON-able), so a resumed stage reads on where it stopped."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The stage ended: release what the objective holds (a reference model, an engine)."""


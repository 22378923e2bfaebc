"""The output head and its cross-entropy in one step, without the (M, V) logits.

`VLMModel.compute_loss` needs each supervised token's cross-entropy under the output head,
`cross_entropy(hidden @ W^T + b, target)`. Computed plainly that is an (M, V) logits matrix in fp32
and a gradient of the same size: at Qwen's 152k vocabulary and 16k supervised tokens, 9 GiB each.
`linear_cross_entropy` gives the same per-token losses while holding only one chunk of tokens'
logits at a time (Wijmans et al. 2024, "Cut your losses"; Liger-Kernel's fused linear
cross-entropy, Hsu et al. 2024):

- **chunked** (every device; the reference): a `torch.autograd.Function` that walks the tokens in
  chunks; per chunk it computes the logits in the head's dtype, the log-softmax and loss in fp32,
  and, when gradients are wanted, the softmax-minus-one-hot gradient at once, projected into the
  gradients of hidden, weight and bias (accumulated in fp32). Only those gradients outlive the
  forward. Backward scales them by the upstream gradient: hidden's row by row (exact for any
  upstream gradient), weight's and bias's as a whole when every token's upstream gradient is the
  same (a mean or sum of the losses: supervised training). An objective that weighs tokens apart
  (a policy gradient through `token_loss`) gets the weight and bias gradients recomputed chunk by
  chunk with each token's weight folded in before the sum over tokens, where it has to be.
- **liger** (CUDA with `liger-kernel` installed, the `gpu` extra): Liger's Triton kernel with
  `reduction="none"`, which recomputes the logits in its backward (its releases before 0.8.2
  summed the weight gradient before the per-token weights were known; pyproject asks for 0.8.2).

Under autocast both run the matmuls in the autocast dtype, as the plain `F.linear` would.
`output_projection` says whether a head is a plain linear map these can replace: LoRA on the head
(an extra low-rank term with its own parameters) is not, and takes the plain path.

Shape suffixes: M tokens, D hidden width, V vocabulary, C tokens of a chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.constants import IGNORE_INDEX

LossBackend = Literal["auto", "chunked", "liger"]

LIGER_ACCUM_DTYPE = torch.float32
"""Liger's weight-gradient accumulator: fp32 even for a bf16 head, as the chunked path keeps it."""


def fused_loss_wanted(setting: str, device: torch.device) -> bool:
    """Whether a stage with `fused_loss: setting` (auto, on or off; config.py's `Stage`) runs
    `linear_cross_entropy` on `device`: auto turns it on for CUDA only. On the CPU the plain path
    is faster at small vocabularies (docs/benchmarks.md, "Loss memory") and stays the default, so
    CPU runs keep their numbers."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def output_projection(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, D), bias (V,) or None) of an output head that computes `x @ W^T + b` and nothing
    else, or None for a head that does more (a LoRA-wrapped or otherwise subclassed linear layer,
    whose own `forward` adds terms). A tied head is the embedding matrix used as a linear map."""
    if isinstance(head, nn.Embedding):
        return head.weight, None
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head.weight, head.bias
    return None


MIN_CHUNK_TOKENS = 256
"""The smallest default chunk: every chunk reads the whole (V, D) head in each of its matmuls, so
chunks of a few tokens are bound by those reads, not by arithmetic (docs/benchmarks.md, "Loss
memory")."""


def default_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk such that a chunk's logits (C, V) hold about as many numbers as the hidden
    states (M, D) (Liger's rule), rounded up to a power of two, and at least MIN_CHUNK_TOKENS."""
    chunks = math.ceil(vocab_size / hidden_size)
    return max(MIN_CHUNK_TOKENS, 1 << math.ceil(math.log2(max(1, math.ceil(num_tokens / chunks)))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk_size: int | None = None,
                         backend: LossBackend = "auto") -> torch.Tensor:
    """Per-token `F.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")`, hidden
    (M, D), weight (V, D), targets (M,) (IGNORE_INDEX: loss 0, no gradient) -> (M,) in fp32 (fp64
    for fp64 inputs), without materialising the (M, V) logits.

    backend: "chunked" (any device), "liger" (CUDA, needs liger-kernel), or "auto" (liger where
    it runs, chunked otherwise). chunk_size: tokens per chunk of the chunked path (default
    `default_chunk_size`)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy takes hidden (M, D), weight (V, D) and targets (M,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if backend not in ("auto", "chunked", "liger"):
        raise ValueError(f"loss backend must be auto, chunked or liger, got {backend!r}")
    liger = _liger_function() if hidden.is_cuda and backend != "chunked" else None
    if backend == "liger" and liger is None:
        raise RuntimeError("the liger loss backend needs CUDA tensors and liger-kernel (pip install 'vlmkit[gpu]')")
    if liger is not None:
        return liger(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="none",
                     accum_dtype=LIGER_ACCUM_DTYPE)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])
    # the inputs are in the autocast dtype already; inside, the softmax and the gradient accumulators
    # stay fp32 and the forward's and backward's matmuls run alike (backward runs outside autocast)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, bias, size)
        return _chunked_pass(hidden, weight, targets, bias, size, (False, False, False))[0]


@functools.cache
def _liger_function():
    """Liger's functional fused linear cross-entropy, or None where liger-kernel is not installed.
    Imported on the first CUDA call: liger-kernel (and the Triton it runs on) is optional."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _chunks(num_tokens: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, num_tokens)) for start in range(0, num_tokens, size)]


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
                with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: per-token losses (C,) and, when `with_grad`, d loss / d logits (C, V), both in
    the accumulator dtype (softmax minus one-hot, zero on ignored tokens)."""
    logits = F.linear(hidden, weight, bias)  # (C, V)
    logits = logits.to(_accumulator_dtype(logits.dtype))
    valid = targets != IGNORE_INDEX
    picked = torch.where(valid, targets, 0)
    target_logits = logits.gather(1, picked[:, None]).squeeze(1)
    # log-sum-exp by hand, in the logits' own memory: torch.logsumexp would hold a second (C, V)
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    total = exps.sum(dim=-1, keepdim=True)
    losses = torch.where(valid, (row_max + total.log()).squeeze(1) - target_logits, 0.0)
    if not with_grad:
        return losses, None
    grad = exps.div_(total)  # the softmax
    grad[torch.arange(len(picked), device=grad.device), picked] -= 1.0
    grad.mul_(valid[:, None])
    return losses, grad


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where losses, the softmax and summed gradients live: fp32, or the input's wider dtype (fp64
    in gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _accumulate(acc: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (V, D) += grad^T (V, C) @ hidden (C, D), the product in hidden's dtype."""
    if acc.dtype == hidden.dtype:
        acc.addmm_(grad.t(), hidden)
    else:
        acc.add_(grad.t() @ hidden)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`linear_cross_entropy`'s chunked path (see the module docstring): forward computes the
    losses and the gradients for an upstream gradient of ones; backward scales them, or recomputes
    the weight's and bias's where tokens are weighted apart."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk_size: int):
        ctx.wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        losses, grads = _chunked_pass(hidden, weight, targets, bias, chunk_size, ctx.wants)
        ctx.save_for_backward(hidden, weight, targets, bias)
        # On ctx rather than saved: backward scales them in place and drops them, so a second
        # backward (retain_graph) finds none and recomputes instead of reading scaled ones.
        ctx.precomputed = grads
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        hidden, weight, targets, bias = ctx.saved_tensors
        precomputed, ctx.precomputed = ctx.precomputed, None
        want_hidden, want_weight, want_bias = ctx.wants
        if precomputed is None:
            _, (grad_hidden, grad_weight, grad_bias) = _chunked_pass(hidden, weight, targets, bias, ctx.chunk_size,
                                                                     ctx.wants, grad_losses)
            return grad_hidden, grad_weight, None, grad_bias, None
        grad_hidden, grad_weight, grad_bias = precomputed
        if want_hidden:  # each row is one token's gradient: exact for any upstream gradient
            grad_hidden.mul_(grad_losses[:, None].to(grad_hidden.dtype))
        if want_weight or want_bias:
            shared = _shared_value(grad_losses)
            if shared is not None:  # in place: no second (V, D) matrix
                for grad in (grad_weight, grad_bias):
                    if grad is not None:
                        grad.mul_(shared)
            else:
                _, (_, grad_weight, grad_bias) = _chunked_pass(hidden, weight, targets, bias, ctx.chunk_size,
                                                               (False, want_weight, want_bias), grad_losses)
        return grad_hidden, grad_weight, None, grad_bias, None


def _shared_value(values: torch.Tensor) -> torch.Tensor | None:
    """The value every element of `values` (M,) holds (0 when there are none), or None when they
    differ. One device sync per backward."""
    if values.numel() == 0:
        return values.new_zeros(())
    return values[0] if bool((values == values[0]).all()) else None


def _chunked_pass(hidden, weight, targets, bias, size: int, wants: tuple[bool, bool, bool],
                  token_weights: torch.Tensor | None = None):
    """Chunk by chunk: the losses (M,) and the gradients of sum_i w_i loss_i wrt hidden, weight and
    bias, each where `wants` says (else None); w are `token_weights` (M,), or ones. Each token's
    weight scales its logits gradient before the sum over tokens, where a per-token weight has to
    enter the weight's and bias's gradients."""
    want_hidden, want_weight, want_bias = wants
    accumulator = _accumulator_dtype(hidden.dtype)
    losses = hidden.new_empty(hidden.shape[0], dtype=accumulator)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=accumulator) if want_weight else None
    grad_bias = torch.zeros_like(bias, dtype=accumulator) if want_bias else None
    for c in _chunks(hidden.shape[0], size):
        losses[c], grad = _chunk_loss(hidden[c], weight, targets[c], bias, with_grad=any(wants))
        if grad is None:
            continue
        if token_weights is not None:
            grad.mul_(token_weights[c, None].to(accumulator))
        if want_bias:
            grad_bias.add_(grad.sum(0))
        grad = grad.to(hidden.dtype)
        if want_hidden:
            grad_hidden[c] = grad @ weight
        if want_weight:
            _accumulate(grad_weight, grad, hidden[c])
        del grad  # free this chunk's (C, V) before the next one is made
    return losses, (grad_hidden, grad_weight, grad_bias)

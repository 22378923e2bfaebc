"""Muon for the hidden matrices and AdamW for the rest, as one optimizer (a stage's `optimizer: muon`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is
Scalable for LLM Training", the recipe of Moonlight and Kimi K2) steps a weight matrix by the
orthogonalised momentum of its gradient: the momentum's singular values are pushed towards 1 by a
few Newton-Schulz iterations, so every direction of the update moves at the same rate, where
AdamW's update is dominated by the few directions that carry most of the gradient. It is meant
for the hidden matrices only: the weights of the linear layers inside the vision tower, the
adapter and the LLM. Embeddings, position tables, convolution kernels (patch embeddings), the
LLM's output head, norms, biases and other vectors keep AdamW, as every Muon recipe does
(`muon_parameters` says which is which).

The update of an (A, B) matrix is scaled by 0.2 * sqrt(max(A, B)) (Moonshot's rule), which gives
it about the RMS of an AdamW update: a stage's learning rates and weight decay mean the same under
both optimizers, so switching one stage to Muon needs no new rates. `muon_lr_scale` multiplies
the Muon matrices' rate where a model wants more (the demo's 192-wide decoder measured best at 4;
docs/training.md, "Optimizers").

`MuonAdamW` is one `torch.optim.Optimizer`: its param groups carry `muon: True | False`, so the
schedule (`set_lr`), the checkpoint files and DCP's sharded optimizer state see one optimizer as
they see AdamW. Its AdamW groups run `torch.optim.adamw.adamw` exactly as `torch.optim.AdamW`
(foreach=False) does; its Muon groups equal `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`
except that the Newton-Schulz iterations run in fp32 on the CPU (PyTorch's run in bf16 on every
device, and bf16 matmuls are ~30x slower on CPUs without bf16 instructions) and in bf16 on GPUs.
Under FSDP2 a matrix's momentum stays sharded; its full value is gathered for the iterations and
each rank keeps its own rows of the result (every rank computes the same full update).

Shape suffixes: A, B a matrix's rows and columns.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton-Schulz coefficients of Jordan et al. (PyTorch's defaults): chosen for the
steepest slope at zero, so five iterations bring every singular value into about [0.7, 1.2]."""
NS_STEPS = 5
NS_EPS = 1e-7
RMS_MATCH = 0.2
"""Moonshot's scale: an orthogonal (A, B) update times 0.2 * sqrt(max(A, B)) has AdamW's typical RMS."""


def newton_schulz(matrix: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The orthogonalised (A, B) `matrix` (about U V^T of its SVD U S V^T), computed in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters Muon steps: the weights of the linear layers, except the LLM's output
    head (an untied `lm_head`; a tied head is the embedding table, which is not a linear layer).
    Everything else (embeddings, convolutions, norms, biases, routers, position tables) is AdamW's."""
    head = getattr(getattr(model, "llm", None), "lm_head", None)
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}


def split_muon_groups(groups: list[dict], muon_ids: set[int], lr_scale: float = 1.0) -> list[dict]:
    """Each param group split into its Muon part (`muon: True`, named NAME.muon, its `lr` and
    `peak_lr` times `lr_scale`) and the rest (`muon: False`); empty parts are dropped."""
    out = []
    for group in groups:
        hidden = [p for p in group["params"] if id(p) in muon_ids]
        rest = [p for p in group["params"] if id(p) not in muon_ids]
        if hidden:
            rates = {key: group[key] * lr_scale for key in ("lr", "peak_lr") if key in group}
            out.append({**group, **rates, "params": hidden, "muon": True, "name": f"{group['name']}.muon"})
        if rest:
            out.append({**group, "params": rest, "muon": False})
    return out


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the groups with `muon: True`, AdamW over the others (module docstring).

    Each group has `lr` and `weight_decay`; `betas` and `eps` are AdamW's, `momentum` and
    `nesterov` Muon's. A Muon group holds 2-D parameters only. `ns_dtype`: the dtype of the
    Newton-Schulz iterations; None: fp32 on the CPU, bf16 on CUDA."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = NS_STEPS, ns_dtype: torch.dtype | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps, "muon": False}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"]:
                shapes = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if shapes:
                    raise ValueError(f"a Muon param group holds matrices only; got shapes {shapes}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            orthogonal = self._orthogonalised(update, group["ns_steps"], self.ns_dtype)
            A, B = p.shape
            p.mul_(1 - lr * decay)
            p.add_(orthogonal.to(p.dtype), alpha=-lr * RMS_MATCH * math.sqrt(max(A, B)))

    @staticmethod
    def _orthogonalised(update: torch.Tensor, steps: int, dtype: torch.dtype | None) -> torch.Tensor:
        """Newton-Schulz of the full matrix; a sharded (DTensor) update is gathered first and the
        result cut back to this rank's shard (every rank holds the same full result)."""
        if dtype is None:
            dtype = torch.bfloat16 if update.device.type == "cuda" else torch.float32
        if isinstance(update, DTensor):
            full = newton_schulz(update.full_tensor(), steps, dtype)
            return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
        return newton_schulz(update, steps, dtype)

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's step (foreach=False): the same state and the same kernels."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # the step count as torch.optim.AdamW keeps it: a float64 tensor under a float64 default
                state["step"] = torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                             else torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False, capturable=False,
              differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)

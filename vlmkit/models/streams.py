"""Two independent branches of a forward pass run concurrently on two CUDA streams.

`run_branches(side, main, side_inputs)` runs `side()` on a side stream while `main()` runs on the
caller's (current) stream, and returns both results ready for use on the current stream. On the CPU
(or when the inputs are not on a CUDA device) it runs `side()` then `main()`, one after the other:
that sequential path is the reference and the fallback, and gives the same results.

The synchronisation follows PyTorch's CUDA stream semantics (the "CUDA semantics" notes, "Stream
semantics of backward passes"):

- the side stream first waits for the current one, so the side branch sees its inputs, and weights
  an optimizer step has just updated, complete;
- tensors allocated on the current stream and read on the side one (`side_inputs`) are marked with
  `record_stream(side)`, so the caching allocator does not hand their memory out again while the
  side stream (or the backward kernels that autograd later runs on it) may still read them;
- the current stream then waits for the side one, and every tensor the side branch returns is
  marked with `record_stream(current)` for the same reason in the other direction;
- autograd runs each backward kernel on the stream of its forward op and synchronises the streams
  where a gradient crosses them, so training needs nothing more; `backward()` leaves the gradients
  ready on the stream it was called on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Main = TypeVar("Main")


def run_branches(side: Callable[[], Sequence[torch.Tensor]], main: Callable[[], Main],
                 side_inputs: Sequence[torch.Tensor]) -> tuple[Sequence[torch.Tensor], Main]:
    """(side(), main()): on a side CUDA stream and the current one when `side_inputs` are on a CUDA
    device, else sequentially (side first, the order of the sequential path everywhere). `side`
    returns the tensors the caller reads afterwards; `side_inputs` are the tensors it reads that
    were made on the current stream."""
    device = side_inputs[0].device
    if device.type != "cuda":
        return side(), main()
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device=device)  # from PyTorch's per-device pool: no new CUDA stream per call
    stream.wait_stream(current)
    for tensor in side_inputs:
        tensor.record_stream(stream)
    with torch.cuda.stream(stream):
        side_outputs = side()
    main_output = main()
    current.wait_stream(stream)
    for tensor in side_outputs:
        tensor.record_stream(current)
    return side_outputs, main_output

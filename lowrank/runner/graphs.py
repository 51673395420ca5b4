"""A training micro-batch's forward and backward replayed as one CUDA graph per batch shape.

A small model on a GPU is launch-bound: MiniLM's step (6 blocks, batch 32 × 64 tokens) is a few hundred
kernels of microseconds each, and the host spends longer launching them than the GPU spends running them.
``GraphedStep`` captures everything from the embedding to the loss and its backward (transformers' mask
construction, the blocks with their adapters, the head, the cross-entropy, autograd's backward kernels)
into one ``torch.cuda.CUDAGraph`` per input shape, the first time it sees that shape, and then replays it:
one launch per micro-batch. There is no code generation: the graph holds the eager kernels, so the maths is
the eager step's and capture costs milliseconds. With ``length_buckets`` there are a few shapes only.

What stays outside the graph and why: gradient clipping and AdamW (PyTorch's fused multi-tensor kernels,
a few launches, float learning rate: the schedule stays a Python function and checkpoints keep their
format) and the gradient reset (``zero_grad(set_to_none=False)``, so the graph can accumulate into the
same ``.grad`` tensors under gradient accumulation). Gradients live outside the graph's memory pool and
persist between replays; each replay adds its micro-batch's gradient to them, as an eager backward does.

Memory: the graphs share one memory pool. That is safe because each graph is self-contained (its inputs
and the gradients live outside the pool, its only output, the loss, is copied right after the replay) and
the graphs run one after another on one stream.

Randomness: dropout inside a graph draws from PyTorch's graph-safe Philox state, which advances with
every replay; a resumed run restores the CUDA RNG state before any capture, so it replays the same
masks. The warm-up passes a capture needs run on a side stream with the RNG state and the gradients saved
and put back, so capturing changes nothing in the training run.

A step that cannot be captured (an operation that syncs with the host, e.g. a data-dependent shape) is
run eagerly from then on for that shape, with one warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["GraphedStep"]

#: eager passes on a side stream before a capture (lazy initialisation of cuBLAS handles, autograd's
#: device threads and the allocator's stream bookkeeping must not happen inside the capture)
WARMUP = 2


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static input buffers the graph reads
    loss: torch.Tensor               # static output the graph writes


class GraphedStep:
    """``step(batch) -> loss`` (a function that runs the forward, calls ``backward`` on the loss and
    returns it detached) made to replay a CUDA graph per batch shape; call it like ``step``.

    ``params`` are the trainable tensors; their ``.grad`` become persistent zero tensors here (reset with
    ``optimizer.zero_grad(set_to_none=False)`` between optimizer steps, never set to ``None``).
    """

    def __init__(self, step: Callable[[dict], torch.Tensor], params: list[torch.Tensor], device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}; use trainer.compile=off on the CPU")
        self.step, self.params, self.device = step, params, device
        self.captures: dict[tuple, _Capture | None] = {}
        self.pool = None  # one memory pool for every shape's graph (they never run at the same time)
        # one warm-up stream for all captures: cuBLAS keeps a workspace per stream (~32 MB each on a Hopper GPU)
        self.side = torch.cuda.Stream(device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    @staticmethod
    def key(batch: dict[str, torch.Tensor]) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        key = self.key(batch)
        if key not in self.captures:
            self.captures[key] = self._capture(batch)
        entry = self.captures[key]
        if entry is None:
            return self.step(batch)
        for name, tensor in batch.items():
            entry.inputs[name].copy_(tensor, non_blocking=True)
        entry.graph.replay()
        return entry.loss.clone()  # the static output is overwritten by the next replay

    def _capture(self, batch: dict[str, torch.Tensor]) -> _Capture | None:
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        grads = [p.grad.clone() for p in self.params]
        rng = torch.cuda.get_rng_state(self.device)
        try:
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                for _ in range(WARMUP):
                    self.step(inputs)
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            torch.cuda.set_rng_state(rng, self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self.step(inputs)
            self.pool = graph.pool()
        except RuntimeError as err:  # an operation that cannot be captured
            log.warning("the training step for inputs %s could not be captured as a CUDA graph (%s); it runs "
                        "eagerly", {n: tuple(s) for n, s, _ in self.key(batch)}, str(err).splitlines()[0])
            torch.cuda.synchronize(self.device)
            entry = None
        else:
            entry = _Capture(graph, inputs, loss)
        torch.cuda.set_rng_state(rng, self.device)
        torch._foreach_copy_([p.grad for p in self.params], grads)  # the warm-up passes' gradients undone
        return entry

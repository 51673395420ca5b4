"""Training one run on several processes with PyTorch DDP, started by ``torchrun``; and which GPU a job gets.

``torchrun --nproc_per_node N run.py ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; ``current()``
then joins the process group (NCCL on GPUs, gloo on the CPU). The training loop asks this module to

- wrap the model in ``DistributedDataParallel`` so that only the *trainable* parameters (adapters, a new
  head) are all-reduced: the frozen base is registered as ignored, so it is neither broadcast at start
  nor synchronised (every rank loads the same pretrained weights itself);
- shard each global batch: rank k takes rows k, k+N, k+2N... of the step's ``batch_size`` examples, so
  the data order, the global batch and (for mean losses over equal shards) the gradient are those of a
  one-process run;
- average logged losses across ranks; only rank 0 evaluates, writes checkpoints, results and logs.

Outside torchrun everything here is a no-op (world size 1). ``job_device`` gives each job of a
parallel sweep on a multi-GPU machine (``hydra/launcher=parallel``, joblib) its own GPU.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def device(self, name: str, job_num: int = 0) -> torch.device:
        if self.active and name == "auto" and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return job_device(name, job_num)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP over the trainable parameters only (the module itself when not distributed)."""
        if not self.active:
            return model
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, indices: list[int]) -> list[int]:
        if not self.active:
            return indices
        if len(indices) % self.size:
            raise ValueError(f"trainer.batch_size={len(indices)} is not divisible by the {self.size} processes; "
                             f"fix: choose a batch size that is a multiple of {self.size}")
        return indices[self.rank::self.size]

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return model.no_sync() if self.active and not last_micro_batch else nullcontext()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current() -> World:
    """This process's place in a torchrun launch (joining the process group once), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return World(rank, size, local_rank)


def torchrun_overrides(argv: list[str], env=os.environ) -> list[str]:
    """Hydra overrides that make a torchrun launch write one run directory, from rank 0 only.

    Each process composes the config itself, so the default ``outputs/${now:...}`` could differ between
    ranks started a second apart: without an explicit ``hydra.run.dir`` all ranks use
    ``outputs/torchrun/<TORCHELASTIC_RUN_ID>`` (one id per launch). Ranks above 0 write neither
    ``.hydra/`` nor ``run.log``.
    """
    if int(env.get("WORLD_SIZE", "1")) <= 1 or any(a in ("-m", "--multirun") for a in argv):
        return []
    extra = []
    if not any(a.lstrip("+~").startswith("hydra.run.dir=") for a in argv):
        run_id = env.get("TORCHELASTIC_RUN_ID")
        if not run_id or run_id == "none":
            raise ValueError("under torchrun without a rendezvous id the ranks cannot agree on a run directory; "
                             "pass hydra.run.dir=outputs/<name> (or launch with torchrun --standalone)")
        extra.append(f"hydra.run.dir=outputs/torchrun/{run_id}")
    if int(env.get("RANK", "0")) > 0:
        extra += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    return extra


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def job_device(name: str, job_num: int = 0) -> torch.device:
    """``auto``: CUDA if there is one, else the CPU; with several visible GPUs, job n of a parallel sweep
    takes GPU n mod count (a SLURM job sees only its own GPUs, so it takes GPU 0)."""
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", job_num % torch.cuda.device_count())

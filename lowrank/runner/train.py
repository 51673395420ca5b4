"""The training loop: plain PyTorch, one function (``fit``) you can read top to bottom.

AdamW (weight decay on ≥2-D tensors only), linear warm-up then linear decay to zero, gradient clipping and
accumulation, bf16 autocast on CUDA, evaluation every ``eval_every`` steps (and at the end) keeping the best
and final metrics, a tqdm bar when attached to a terminal.

Speed. On CUDA the loop takes the fast path of ``lowrank.runner.accel`` (``trainer.compile``,
``trainer.fused_loss``, ``trainer.length_buckets``; see ``accel.plan``): a small model's whole forward and
backward replayed as one CUDA graph per batch shape (``lowrank.runner.graphs``), a large model's blocks
compiled with CUDA graphs, batches padded to a few fixed widths, the fused causal-LM loss. The loop never
waits for the GPU inside a step: each step's loss stays on the device, and the losses since the last read
are read at once when the loop logs, evaluates or checkpoints (one host sync per logged step).

Determinism and resume. Every random draw comes from a seeded source: the model's new head and the adapter
initialisation from torch's global RNG (seeded by ``seed_everything`` before the model is built), dropout
from the same global RNG, and the data order from a generator seeded by ``(seed, epoch)`` — so the batch
sequence is a pure function of the seed and the step. A checkpoint (every ``checkpoint_every`` steps, and at
the end; ``lowrank.runner.checkpoints``) holds the trainable tensors, the optimizer, scheduler and RNG states
and the loop's state. Resuming restores all of it and skips the batches already consumed, so an interrupted
run ends with the same numbers as an uninterrupted one.

Trajectory. At the steps in ``save_weights_at`` (or every ``save_weights_every``), the target modules'
effective weights W0 + ΔW (float32, ``(out, in)``) go to ``checkpoints/weights-step{N}.safetensors`` and are
never deleted — the input of DoRA's Figure 2 magnitude/direction analysis.

A NaN or infinite loss raises ``TrainingFailed`` with the first step that had one (found when the losses
are read, at most ``log_every`` steps later, and always before an evaluation or a checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lowrank.atomic import write_text
from lowrank.runner import accel, distributed, graphs
from lowrank.runner.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from lowrank.runner.data import TaskData, bucket_width, collate
from lowrank.runner.evaluate import evaluate
from lowrank.runner.loss import autocast, batch_loss, can_fuse, loss_fn
from lowrank.runner.rundir import CHECKPOINTS, GENERATIONS

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """Training cannot go on (a non-finite loss); ``step`` is the optimizer step it happened at."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class FitResult:
    steps: int
    final: dict                      # metrics of the last evaluation (with "step")
    best: dict                       # metrics of the best evaluation by `metric` (with "step")
    resumed_from: int | None = None  # the checkpoint step this process started from
    wall_time_s: float = 0.0         # training time summed over every process that worked on the run
    generations: list = field(default_factory=list)
    step_time_s: float | None = None    # median training step of this process (between host syncs)
    first_step_at: float | None = None  # wall clock (time.time()) when this process's first step was done
    fast_path: str = ""                 # what accel.plan chose


# ---- set-up -------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, *,
                   decay_magnitude: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on 1-D tensors (biases, norms), nor on DoRA magnitudes
    unless ``decay_magnitude`` (the official DoRA code decays every parameter except biases and LayerNorm
    weights, the magnitude m included: NVlabs/DoRA, VL-T5 ``trainer_base.py``). On CUDA with float32
    parameters, PyTorch's fused kernel (one launch for the whole update, same maths)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = [p.ndim >= 2 or (decay_magnitude and n.endswith("magnitude")) for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": weight_decay},
              {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
    fused = bool(named) and all(p.is_cuda and p.dtype == torch.float32 for _, p in named)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused or None)


def fraction_steps(fractions, total: int) -> set[int]:
    """Optimizer steps at fractions of training (0.25 → a quarter of ``total``), for the weight trajectory."""
    return {int(round(f * total)) for f in fractions}


def probe_head(model: nn.Module, data: TaskData, cfg, device: torch.device, seed: int) -> None:
    """Train only the task head (``classifier``/``score``/...) for ``cfg.head_first_steps`` steps before the
    adaptation, so that a fresh head does not drive the first updates of the layers below it (a linear probe
    then fine-tune, Kumar et al. 2022, arXiv 2202.10054). Target weights are untouched, so W0 is unchanged."""
    from lowrank.core import HEAD_NAMES

    head = [p for name, child in model.named_children() if name in HEAD_NAMES for p in child.parameters()]
    if not head:
        raise ValueError("trainer.head_first_steps > 0 but the model has no classifier/score head; fix: set 0")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(head, lr=cfg.head_first_lr, betas=tuple(cfg.betas))
    lengths = [len(x) for x in data.train["input_ids"]] if cfg.group_by_length else None
    batches = batch_order(len(data.train), cfg.batch_size, seed + 1, lengths=lengths)
    model.train()
    for _ in range(cfg.head_first_steps):
        batch = collate(data.train[next(batches)], data.pad_id, data.kind, device=device)
        with autocast(device, cfg.precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_fn(logits, batch["labels"], data.kind, cfg.label_smoothing).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p in trainable:
        p.requires_grad_(True)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: 0→1 over ``warmup`` steps, then 1→0 at ``total`` (transformers' linear schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


GROUP_WINDOW = 50  # batches per length-sorted window (transformers' LengthGroupedSampler uses 50 too)


def epoch_batches(n: int, batch: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into ``n // batch`` batches (the
    remainder is dropped).

    With ``lengths`` (group by length, as transformers' ``group_by_length``): each window of
    ``GROUP_WINDOW`` batches is sorted by length before it is cut, so a batch holds sentences of similar
    length and pads little, and the batches are then shuffled (same generator). Same examples per epoch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()[:(n // batch) * batch]
    if lengths is not None:
        window = batch * GROUP_WINDOW
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lambda i: lengths[i])]
    batches = [order[b:b + batch] for b in range(0, len(order), batch)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def batch_order(n: int, batch: int, seed: int, start: int = 0, lengths: list[int] | None = None):
    """Yield batches (index lists, one per optimizer step), epoch after epoch, from batch number ``start``.

    Every epoch has ``n // batch`` batches and depends only on (seed, epoch), so batch k of a run is known
    without replaying the earlier ones: that is how a resumed run sees the same data. Gradient accumulation
    splits each batch into micro-batches and does not change the order.
    """
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"the training set has {n} examples, fewer than one batch of {batch}; "
                         f"lower trainer.batch_size")
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(n, batch, seed, epoch, lengths)[offset:]
        epoch, offset = epoch + 1, 0


def total_steps(cfg, n_train: int) -> int:
    return cfg.max_steps or cfg.epochs * (n_train // cfg.batch_size)


def _progress(cfg, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False,
                disable=not (cfg.progress and sys.stderr.isatty()))


def _better(value: float, best: float | None) -> bool:
    return best is None or (not math.isnan(value) and value > best)


# ---- the loop -----------------------------------------------------------------------------------------

class _Losses:
    """Each step's loss, kept on the device until ``read`` copies all of them to the host at once."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self) -> list[float]:
        """The pending losses (one host sync); ``TrainingFailed`` at the first non-finite one."""
        if not self.pending:
            return []
        values = torch.stack([loss for _, loss in self.pending]).cpu().tolist()
        for (step, _), value in zip(self.pending, values):
            if not math.isfinite(value):
                raise TrainingFailed(f"loss is {value} at step {step}", step)
        self.pending = []
        return values


class _StepClock:
    """Training time per step, measured between host syncs (so the GPU's work is inside), over windows
    that hold only training steps; the first step of a process (compilation) is timed on its own."""

    def __init__(self):
        self.start, self.steps, self.per_step, self.first_step_at = time.perf_counter(), 0, [], None

    def step(self, device: torch.device) -> None:
        self.steps += 1
        if self.first_step_at is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once per process: when the first step is really done
            self.first_step_at = time.time()
            self.restart()

    def read(self) -> None:
        """Close the window at a host sync (the losses were just read)."""
        if self.steps:
            self.per_step.append((time.perf_counter() - self.start) / self.steps)
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def median(self) -> float | None:
        return statistics.median(self.per_step) if self.per_step else None


def fit(model: nn.Module, data: TaskData, task, cfg, *, out_dir: Path, seed: int, tracker,
        weight_names: list[str] = (), fingerprint: str = "", identity: dict | None = None,
        world: distributed.World = distributed.World(), job_num: int = 0) -> FitResult:
    """Train ``model`` on ``data.train`` with trainer config ``cfg``; evaluate, checkpoint, resume.

    ``tracker.log(metrics, step)`` receives every logged dict; on resume ``tracker.rewind(step)`` first drops
    what the interrupted process logged after its last checkpoint. ``weight_names`` are the modules whose
    weights form the trajectory. The best evaluation is the one with the highest ``eval/<task.metric>``.
    ``fingerprint`` identifies the configuration (``identity``, stored beside it, says what it was); a
    checkpoint with another fingerprint is not resumed from. Under ``torchrun`` (``world``), each process
    trains on its shard of every batch through DDP and only rank 0 evaluates and writes files.
    """
    device = world.device(cfg.device, job_num)
    model.to(device)
    schedule = getattr(getattr(model, "lowrank_injected", None), "on_step", None)  # gradual unfreezing
    fast = accel.plan(cfg, device, can_fuse(model, data.kind, cfg.label_smoothing, world.active),
                      parameters=sum(p.numel() for p in model.parameters()),
                      graph_blocker=_graph_blocker(world, schedule))
    accel.prepare(model, fast)
    log.info("fast path on %s: %s", device, fast.describe())
    ckpt_dir = out_dir / CHECKPOINTS
    micro = -(-cfg.batch_size // (cfg.grad_accum * world.size))  # rows per micro-batch on this process
    total = total_steps(cfg, len(data.train))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, decay_magnitude=cfg.decay_magnitude)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total))
    weight_steps = set(cfg.save_weights_at)
    if cfg.save_weights_every:
        weight_steps |= set(range(0, total + 1, cfg.save_weights_every)) | {total}
    weight_steps |= fraction_steps(cfg.save_weights_at_fractions, total)
    key = f"eval/{task.metric}"

    state = {"step": 0, "final": None, "best": None, "wall_time_s": 0.0, "loss_sum": 0.0, "loss_count": 0,
             "fingerprint": fingerprint, "identity": identity or {}}
    resumed_from = None
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device)  # its fingerprint: app.run checks it
        resumed_from = state["step"]
        tracker.rewind(resumed_from)
        log.info("resuming from %s (step %d of %d)", ckpt, resumed_from, total)
    else:
        if cfg.head_first_steps:
            probe_head(model, data, cfg, device, seed)
        if 0 in weight_steps and world.is_main:
            save_weights(model, list(weight_names), ckpt_dir, 0)
    net = world.wrap(model, device)  # the module that runs the forward: DDP when distributed

    started = time.time()
    lengths = [len(x) for x in data.train["input_ids"]] if cfg.group_by_length else None
    batches = batch_order(len(data.train), cfg.batch_size, seed, start=state["step"], lengths=lengths)
    losses, clock = _Losses(), _StepClock()
    generations: list = []
    model.train()
    bar = _progress(cfg, total, state["step"])
    graphed = fast.compile == "whole-graph"

    def micro_step(batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch; its loss (÷ grad_accum), detached."""
        with autocast(device, cfg.precision, cache=not graphed):  # a CUDA graph must not outlive autocast's cache
            loss = batch_loss(net, model, batch, data.kind, fused=fast.fused_loss,
                              label_smoothing=cfg.label_smoothing) / cfg.grad_accum
        loss.backward()
        return loss.detach()

    run_micro = graphs.GraphedStep(micro_step, params, device) if graphed else micro_step
    while state["step"] < total:
        step = state["step"] + 1
        if schedule is not None:  # a per-step choice of what trains
            schedule(step)
        indices = world.shard(next(batches))
        step_loss = None
        for m in range(0, len(indices), micro):  # grad_accum micro-batches
            rows = data.train[indices[m:m + micro]]
            batch = collate(rows, data.pad_id, data.kind, device=device,
                            width=bucket_width(max(map(len, rows["input_ids"])), cfg.max_seq_len, fast.buckets))
            if fast.compile in ("cudagraphs", "inductor+cudagraphs"):
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-batch's graph outputs are dead
            with world.no_sync(net, last_micro_batch=m + micro >= len(indices)):
                part = run_micro(batch).float()
            step_loss = part if step_loss is None else step_loss + part
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not graphed)  # a graph adds into the same .grad tensors every step
        state["step"] = step
        losses.add(step, step_loss)
        clock.step(device)
        bar.update(1)

        logs = step % cfg.log_every == 0 or step == total
        evaluates = ((cfg.eval_every and step % cfg.eval_every == 0) or step == total) and world.is_main
        checkpoints = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total
        if not (logs or evaluates or checkpoints or step in weight_steps):
            continue
        values = losses.read()  # the one host sync of these steps
        clock.read()
        state["loss_sum"] += sum(values)
        state["loss_count"] += len(values)
        if logs:
            mean = world.mean(state["loss_sum"] / max(state["loss_count"], 1))
            tracker.log({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0], "train/epoch":
                         step * cfg.batch_size / len(data.train)}, step)
            bar.set_postfix(loss=f"{mean:.4f}")
            state["loss_sum"], state["loss_count"] = 0.0, 0
        if evaluates:
            metrics, generations = evaluate(model, data, task, cfg, device)
            model.train()
            metrics = {**metrics, "step": step}
            tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)
            log.info("step %d/%d: %s", step, total, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                              if k.startswith("eval/")))
            state["final"] = metrics
            if _better(metrics[key], (state["best"] or {}).get(key)):
                state["best"] = metrics
            if generations:
                _write_generations(out_dir, step, generations)
        if step in weight_steps and world.is_main:
            save_weights(model, list(weight_names), ckpt_dir, step)
        if checkpoints:
            state["wall_time_s"] += time.time() - started
            started = time.time()
            if world.is_main:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state)
            world.barrier()  # no rank runs ahead of the checkpoint it would resume from
        clock.restart()  # evaluation and files are not training time
    bar.close()
    state["wall_time_s"] += time.time() - started
    return FitResult(steps=total, final=state["final"], best=state["best"], resumed_from=resumed_from,
                     wall_time_s=state["wall_time_s"], generations=generations, step_time_s=clock.median(),
                     first_step_at=clock.first_step_at, fast_path=fast.describe())


def _graph_blocker(world: distributed.World, schedule) -> str | None:
    """Why the whole training step cannot be one CUDA graph here (None when it can)."""
    if world.active:
        return "DDP synchronises gradients from autograd hooks"
    if schedule is not None:
        return "gradual unfreezing changes what trains during the run"
    return None


def _write_generations(out_dir: Path, step: int, generations: list[dict]) -> None:
    """generations/step{N}.jsonl for every evaluation; generations.jsonl is the latest (the final one)."""
    folder = out_dir / "generations"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    (folder / f"step{step}.jsonl").write_text(text)
    write_text(out_dir / GENERATIONS, text)

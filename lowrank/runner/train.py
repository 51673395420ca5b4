"""The training loop: plain PyTorch. ``fit(FitJob)`` runs a ``Training`` — set-up (``__init__``), one optimizer
step (``step``), then logging, evaluation and checkpoints when due (``after_step``) — to the last step; the
head probe takes the same steps (``micro_step``, ``optimizer_step``).

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
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lowrank.atomic import write_text
from lowrank.hooks import NoHooks, training_hooks
from lowrank.runner import accel, distributed, graphs
from lowrank.runner.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from lowrank.runner.data import TaskData, bucket_width, collate
from lowrank.runner.evaluate import evaluate
from lowrank.runner.loraplus import lora_plus_groups
from lowrank.runner.loss import autocast, batch_loss, can_fuse
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
    step_time_s: float | None = None    # median training step of this process (between host syncs)
    first_step_at: float | None = None  # wall clock (time.time()) when this process's first step was done
    fast_path: str = ""                 # what accel.plan chose


# ---- set-up -------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, *,
                   decay_magnitude: bool = False, lora_plus_ratio: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on 1-D tensors (biases, norms), nor on DoRA magnitudes
    unless ``decay_magnitude`` (the official DoRA code decays every parameter except biases and LayerNorm
    weights, the magnitude m included: NVlabs/DoRA, VL-T5 ``trainer_base.py``). On CUDA with float32
    parameters, PyTorch's fused kernel (one launch for the whole update, same maths)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = [p.ndim >= 2 or (decay_magnitude and n.endswith("magnitude")) for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": weight_decay},
              {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
    groups = lora_plus_groups(groups, {id(p): n for n, p in named}, lr, lora_plus_ratio)  # LoRA+: B at λ·lr
    fused = bool(named) and all(p.is_cuda and p.dtype == torch.float32 for _, p in named)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused or None)


def fraction_steps(fractions, total: int) -> set[int]:
    """Optimizer steps at fractions of training (0.25 → a quarter of ``total``), for the weight trajectory."""
    return {int(round(f * total)) for f in fractions}


def probe_head(model: nn.Module, data: TaskData, cfg, device: torch.device, seed: int) -> None:
    """Train only the task head (``classifier``/``score``/...) for ``cfg.head_first_steps`` steps before the
    adaptation, so that a fresh head does not drive the first updates of the layers below it (a linear probe
    then fine-tune, Kumar et al. 2022, arXiv 2202.10054). Target weights are untouched, so W0 is unchanged.
    The steps are the loop's own (``micro_step``, ``optimizer_step``): a constant ``head_first_lr``, no
    clipping, one micro-batch per step, its own batch order (seed + 1)."""
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
    forward_backward = micro_step(model, model, data.kind, device, cfg.precision, label_smoothing=cfg.label_smoothing)
    model.train()
    for _ in range(cfg.head_first_steps):
        batch = collate(data.train[next(batches)], data.pad_id, data.kind, device=device)
        optimizer_step(optimizer, forward_backward(batch), head)
    for p in trainable:
        p.requires_grad_(True)


def micro_step(net: nn.Module, model: nn.Module, kind: str, device: torch.device, precision: str, *,
               accumulate: int = 1, label_smoothing: float = 0.0, fused: bool = False, graphed: bool = False,
               loss_impl: str = "auto", penalty: Callable[[], torch.Tensor | float] | None = None):
    """The forward and backward of one micro-batch, as a function of the batch that returns its loss
    (÷ ``accumulate``, detached). ``penalty()`` is added to the loss (a method's regulariser). ``graphed``: the
    function is captured as a CUDA graph, which must not outlive autocast's cache of casted weights.
    ``loss_impl``: the fused loss's implementation (``accel.linear_cross_entropy``)."""
    def run(batch: dict) -> torch.Tensor:
        with autocast(device, precision, cache=not graphed):
            loss = batch_loss(net, model, batch, kind, fused=fused, label_smoothing=label_smoothing,
                              loss_impl=loss_impl)
            if penalty is not None:
                loss = loss + penalty()
            loss = loss / accumulate
        loss.backward()
        return loss.detach()

    return run


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float = 0.0, *,
                   scheduler=None, set_to_none: bool = True, after_update: Callable[[], None] | None = None
                   ) -> torch.Tensor:
    """After the micro-batches' backward passes: clip (``max_grad_norm`` > 0), update, ``after_update()`` (a
    method's own step after the update, e.g. a rank schedule), advance the schedule, zero the gradients; return
    the step's ``loss``. ``set_to_none=False`` keeps the ``.grad`` tensors (a CUDA graph adds into the same
    ones every step)."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if after_update is not None:
        after_update()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return loss


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


class _Silent:
    """The tracker of a process that logs nothing (the ranks > 0 of a torchrun launch)."""

    def log(self, *args, **kwargs) -> None: ...
    def rewind(self, *args, **kwargs) -> None: ...


@dataclass
class FitJob:
    """Everything ``fit`` needs, in one object (the app builds it once, for rank 0 and the other ranks).

    ``tracker.log(metrics, step)`` receives every logged dict; on resume ``tracker.rewind(step)`` first drops
    what the interrupted process logged after its last checkpoint (None: nothing is logged). ``weight_names``
    are the modules whose weights form the trajectory. ``fingerprint`` identifies the configuration
    (``identity``, stored beside it, says what it was); a checkpoint with another fingerprint is not resumed
    from. Under ``torchrun`` (``world``), each process trains on its shard of every batch through DDP and only
    rank 0 evaluates and writes files.
    """

    model: nn.Module
    data: TaskData
    task: object                     # cfg.task: kind, metric, ...
    cfg: object                      # cfg.trainer
    out_dir: Path
    seed: int
    tracker: object = None
    weight_names: Sequence[str] = ()
    fingerprint: str = ""
    identity: dict | None = None
    world: distributed.World = field(default_factory=distributed.World)
    job_num: int = 0


class Training:
    """One run's training, in three parts: ``__init__`` sets up (device, fast path, optimizer, schedule, the
    resumed state or the head probe), ``step`` takes one optimizer step, ``after_step`` logs, evaluates,
    saves the trajectory and checkpoints when due. ``fit`` runs them to the last step."""

    def __init__(self, job: FitJob):
        self.job, cfg, model, world = job, job.cfg, job.model, job.world
        self.cfg, self.model, self.data, self.world = cfg, model, job.data, world
        self.tracker = job.tracker if job.tracker is not None else _Silent()
        self.device = device = world.device(cfg.device, job.job_num)
        model.to(device)
        self.schedule = getattr(getattr(model, "lowrank_injected", None), "on_step", None)  # gradual unfreezing
        if cfg.packing:
            accel.refuse_packing(accel.unwrap(model).config, cfg.max_seq_len)
        self.micro = -(-cfg.batch_size // (cfg.grad_accum * world.size))  # rows per micro-batch on this process
        self.fast = accel.plan(cfg, device, can_fuse(model, job.data.kind, cfg.label_smoothing, world.active),
                               parameters=sum(p.numel() for p in model.parameters()),
                               graph_blocker=_graph_blocker(world, self.schedule),
                               packed_width=self.micro * cfg.max_seq_len if cfg.packing else 0)
        accel.prepare(model, self.fast)
        log.info("fast path on %s: %s", device, self.fast.describe())
        self.ckpt_dir = job.out_dir / CHECKPOINTS
        self.total = total = total_steps(cfg, len(job.data.train))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hooks = training_hooks(model, total)  # what the adapter adds to the loop (AdaLoRA: lowrank/hooks.py)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, decay_magnitude=cfg.decay_magnitude,
                                        lora_plus_ratio=cfg.get("lora_plus_ratio"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, total))
        self.weight_steps = set(cfg.save_weights_at)
        if cfg.save_weights_every:
            self.weight_steps |= set(range(0, total + 1, cfg.save_weights_every)) | {total}
        self.weight_steps |= fraction_steps(cfg.save_weights_at_fractions, total)
        self.key = f"eval/{job.task.metric}"

        self.state = {"step": 0, "final": None, "best": None, "wall_time_s": 0.0, "loss_sum": 0.0, "loss_count": 0,
                      "fingerprint": job.fingerprint, "identity": job.identity or {}}
        self.resumed_from = None
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is not None:
            self.state = load_checkpoint(ckpt, model, self.optimizer, self.scheduler, device)  # app.run checked it
            self.resumed_from = self.state["step"]
            self.tracker.rewind(self.resumed_from)
            log.info("resuming from %s (step %d of %d)", ckpt, self.resumed_from, total)
        else:
            if cfg.head_first_steps:
                probe_head(model, job.data, cfg, device, job.seed)
            if 0 in self.weight_steps and world.is_main:
                save_weights(model, list(job.weight_names), self.ckpt_dir, 0)
        self.net = world.wrap(model, device)  # the module that runs the forward: DDP when distributed

        self.started = time.time()
        lengths = [len(x) for x in job.data.train["input_ids"]] if cfg.group_by_length else None
        self.batches = batch_order(len(job.data.train), cfg.batch_size, job.seed, start=self.state["step"],
                                   lengths=lengths)
        self.losses, self.clock = _Losses(), _StepClock()
        model.train()
        self.bar = _progress(cfg, total, self.state["step"])
        self.graphed = self.fast.compile in accel.WHOLE_GRAPH
        forward_backward = micro_step(self.net, model, job.data.kind, device, cfg.precision,
                                      accumulate=cfg.grad_accum, label_smoothing=cfg.label_smoothing,
                                      fused=self.fast.fused_loss, graphed=self.graphed,
                                      loss_impl="torch" if self.fast.compile == "off" else "auto",
                                      penalty=None if isinstance(self.hooks, NoHooks) else self.hooks.penalty)
        self.run_micro = graphs.GraphedStep(forward_backward, self.params, device) if self.graphed else forward_backward

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.total

    def step(self) -> int:
        """One optimizer step: the batch's micro-batches forward and backward, clipping, the update. Returns
        the step number."""
        cfg, data, fast = self.cfg, self.data, self.fast
        step = self.state["step"] + 1
        if self.schedule is not None:  # a per-step choice of what trains
            self.schedule(step)
        indices = self.world.shard(next(self.batches))
        step_loss = None
        for m in range(0, len(indices), self.micro):  # grad_accum micro-batches
            rows = data.train[indices[m:m + self.micro]]
            lengths = [len(x) for x in rows["input_ids"]]
            width = (bucket_width(sum(lengths), self.micro * cfg.max_seq_len, fast.buckets) if fast.packed
                     else bucket_width(max(lengths), cfg.max_seq_len, fast.buckets))
            batch = collate(rows, data.pad_id, data.kind, device=self.device, width=width, packed=fast.packed)
            if fast.compile in ("cudagraphs", "inductor+cudagraphs"):
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-batch's graph outputs are dead
            with self.world.no_sync(self.net, last_micro_batch=m + self.micro >= len(indices)):
                part = self.run_micro(batch).float()
            step_loss = part if step_loss is None else step_loss + part
        optimizer_step(self.optimizer, step_loss, self.params, cfg.max_grad_norm, scheduler=self.scheduler,
                       set_to_none=not self.graphed, after_update=lambda: self.hooks.after_step(step))
        self.state["step"] = step
        self.losses.add(step, step_loss)
        self.clock.step(self.device)
        self.bar.update(1)
        return step

    def after_step(self, step: int) -> None:
        """Log, evaluate, save the trajectory and checkpoint, each when due at ``step``."""
        cfg, state, world = self.cfg, self.state, self.world
        logs = step % cfg.log_every == 0 or step == self.total
        evaluates = ((cfg.eval_every and step % cfg.eval_every == 0) or step == self.total) and world.is_main
        checkpoints = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == self.total
        if not (logs or evaluates or checkpoints or step in self.weight_steps):
            return
        values = self.losses.read()  # the one host sync of these steps
        self.clock.read()
        state["loss_sum"] += sum(values)
        state["loss_count"] += len(values)
        if logs:
            mean = world.mean(state["loss_sum"] / max(state["loss_count"], 1))
            self.tracker.log({"train/loss": mean, "train/lr": self.scheduler.get_last_lr()[0], "train/epoch":
                              step * cfg.batch_size / len(self.data.train)}, step)
            self.bar.set_postfix(loss=f"{mean:.4f}")
            state["loss_sum"], state["loss_count"] = 0.0, 0
        if evaluates:
            self.evaluate(step)
        if step in self.weight_steps and world.is_main:
            save_weights(self.model, list(self.job.weight_names), self.ckpt_dir, step)
        if checkpoints:
            self.checkpoint()
        self.clock.restart()  # evaluation and files are not training time

    def evaluate(self, step: int) -> dict:
        """Evaluate, log, keep the final and the best metrics, write a generation task's texts."""
        metrics, generations = evaluate(self.model, self.data, self.job.task, self.cfg, self.device)
        self.model.train()
        metrics = {**metrics, "step": step}
        self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)
        log.info("step %d/%d: %s", step, self.total, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                               if k.startswith("eval/")))
        self.state["final"] = metrics
        if _better(metrics[self.key], (self.state["best"] or {}).get(self.key)):
            self.state["best"] = metrics
        if generations:
            _write_generations(self.job.out_dir, step, generations)
        return metrics

    def checkpoint(self) -> None:
        """Add the time since the last checkpoint to the run's training time and save a resume checkpoint."""
        self.state["wall_time_s"] += time.time() - self.started
        self.started = time.time()
        if self.world.is_main:
            save_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler, self.state)
        self.world.barrier()  # no rank runs ahead of the checkpoint it would resume from

    def result(self) -> FitResult:
        self.bar.close()
        self.state["wall_time_s"] += time.time() - self.started
        self.started = time.time()
        return FitResult(steps=self.total, final=self.state["final"], best=self.state["best"],
                         resumed_from=self.resumed_from, wall_time_s=self.state["wall_time_s"],
                         step_time_s=self.clock.median(), first_step_at=self.clock.first_step_at,
                         fast_path=self.fast.describe())


def fit(job: FitJob) -> FitResult:
    """Train ``job.model`` on ``job.data.train`` with trainer config ``job.cfg``; evaluate, checkpoint, resume.
    The best evaluation is the one with the highest ``eval/<task.metric>``."""
    training = Training(job)
    while not training.done:
        training.after_step(training.step())
    return training.result()


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

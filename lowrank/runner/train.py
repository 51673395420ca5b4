"""The training loop: plain PyTorch, one function (``fit``) you can read top to bottom.

AdamW (weight decay on ≥2-D tensors only), linear warm-up then linear decay to zero, gradient clipping and
accumulation, bf16 autocast on CUDA, evaluation every ``eval_every`` steps (and at the end) keeping the best
and final metrics, a tqdm bar when attached to a terminal.

Determinism and resume. Every random draw comes from a seeded source: the model's new head and the adapter
initialisation from torch's global RNG (seeded by ``seed_everything`` before the model is built), dropout
from the same global RNG, and the data order from a generator seeded by ``(seed, epoch)`` — so the batch
sequence is a pure function of the seed and the step. A checkpoint (every ``checkpoint_every`` steps, and at
the end) holds the trainable tensors (safetensors), the optimizer and scheduler state and the torch RNG
(``optimizer.pt``, read back with ``weights_only=True``), and the loop's state and Python/NumPy RNG
(``state.json``); it is written to a temporary folder and renamed, and older ones are deleted. Resuming
restores all of it and skips the batches already consumed, so an interrupted run ends with the same numbers
as an uninterrupted one.

Trajectory. At the steps in ``save_weights_at`` (or every ``save_weights_every``), the target modules'
effective weights W0 + ΔW (float32, ``(out, in)``) go to ``checkpoints/weights-step{N}.safetensors`` and are
never deleted — the input of DoRA's Figure 2 magnitude/direction analysis.

A NaN or infinite loss raises ``TrainingFailed`` with the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.atomic import atomic_path, write_text
from lowrank.io import save_tensors
from lowrank.runner import distributed
from lowrank.runner.rundir import CHECKPOINTS, GENERATIONS, weights_file
from lowrank.io import load_into
from lowrank.runner.data import IGNORE, TaskData, collate, left_pad
from lowrank.runner.metrics import accuracy, corpus_bleu, matthews_corrcoef

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


# ---- set-up -------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (``auto``) or where asked (``bf16``); float32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, *,
                   decay_magnitude: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on 1-D tensors (biases, norms), nor on DoRA magnitudes
    unless ``decay_magnitude`` (the official DoRA code decays every parameter except biases and LayerNorm
    weights, the magnitude m included: NVlabs/DoRA, VL-T5 ``trainer_base.py``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = [p.ndim >= 2 or (decay_magnitude and n.endswith("magnitude")) for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": weight_decay},
              {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))


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
        batch = {k: v.to(device) for k, v in collate(data.train[next(batches)], data.pad_id, data.kind).items()}
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


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy: per sequence for classification, per target token (shifted) for generation."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, label_smoothing=label_smoothing)


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, task, cfg, device: torch.device) -> tuple[dict, list]:
    """``({"eval/<metric>": value}, generations)`` on the eval set; the model is left in eval mode."""
    model.eval()
    loss_sum, count, predicted = 0.0, 0, {}
    ev = data.eval
    # batches of similar length pad little; predictions go back to dataset order
    order = sorted(range(len(ev)), key=lambda i: len(ev[i]["input_ids"]))
    for start in range(0, len(order), cfg.eval_batch_size):
        indices = order[start:start + cfg.eval_batch_size]
        batch = {k: v.to(device) for k, v in collate(ev[indices], data.pad_id, data.kind).items()}
        with autocast(device, cfg.precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += loss_fn(logits, batch["labels"], data.kind).item() * len(indices)
        count += len(indices)
        if data.kind == "classification":
            predicted.update(zip(indices, logits.argmax(-1).tolist()))
    metrics = {"eval/loss": loss_sum / max(count, 1)}
    if data.kind == "classification":
        labels = list(ev["labels"])
        predictions = [predicted[i] for i in range(len(ev))]
        metrics["eval/accuracy"] = accuracy(predictions, labels)
        metrics["eval/mcc"] = matthews_corrcoef(predictions, labels)
        return metrics, []
    generations = generate(model, data, task, cfg, device)
    metrics["eval/bleu"] = corpus_bleu([g["prediction"] for g in generations], data.references)
    return metrics, generations


@torch.no_grad()
def generate(model: nn.Module, data: TaskData, task, cfg, device: torch.device) -> list[dict]:
    """Decode every eval prompt (greedy, or beam search with ``task.generation.num_beams``)."""
    gen = task.generation
    out = []
    tokenizer_eos = model.generation_config.eos_token_id
    for start in range(0, len(data.prompts), cfg.eval_batch_size):
        prompts = data.prompts[start:start + cfg.eval_batch_size]
        batch = {k: v.to(device) for k, v in left_pad(prompts, data.pad_id).items()}
        with autocast(device, cfg.precision):
            ids = model.generate(**batch, max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams,
                                 length_penalty=gen.length_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
                                 do_sample=False, pad_token_id=data.pad_id, eos_token_id=tokenizer_eos)
        for i, row in enumerate(ids[:, batch["input_ids"].shape[1]:].tolist()):
            text = data.decode(row).strip()
            # E2E references are one line: a description ends at the first line break (the model may go on)
            out.append({"mr": data.sources[start + i], "prediction": text.split("\n")[0].strip(),
                        "references": data.references[start + i]})
    return out


# ---- weights and checkpoints --------------------------------------------------------------------------

def target_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The effective weight of each named module as a float32 ``(out, in)`` matrix: W0 + ΔW for an
    adapted layer, the layer's own weight otherwise (full fine-tuning, BitFit, head)."""
    from lowrank.adapters.base import AdaptedLayer, layer_kind, weight_matrix

    out = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLayer):
            w = module.base_matrix().detach().float() + module.delta_weight()
        else:
            w = weight_matrix(module, layer_kind(module)).detach().float()
        out[name] = w.cpu().contiguous()
    return out


def save_weights(model: nn.Module, names: list[str], folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_tensors(folder / weights_file(step), target_weights(model, names), {"step": str(step)})


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (``step-N``), ignoring half-written ``.tmp`` ones."""
    done = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoint ``step-N`` atomically (temporary folder, then rename) and delete the older ones."""
    from lowrank import trainable_state_dict

    final = folder / f"step-{state['step']}"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_tensors(tmp / "trainable.safetensors", trainable_state_dict(model))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        rng = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng}, indent=1))
    for old in folder.glob("step-*"):  # keep the newest only (and drop half-written ones)
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    """Restore a ``save_checkpoint`` folder into model/optimizer/scheduler and the RNGs; return the state."""
    tensors = load_file(str(path / "trainable.safetensors"))
    load_into(model, tensors, f"checkpoint {path}", fix="it belongs to another configuration: delete it or "
                                                         "use another run dir")
    blob = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"].cpu())
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in blob["cuda_rng"]])
    state = json.loads((path / "state.json").read_text())
    rng = state.pop("rng")
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _progress(cfg, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False,
                disable=not (cfg.progress and sys.stderr.isatty()))


def _better(value: float, best: float | None) -> bool:
    return best is None or (not math.isnan(value) and value > best)


# ---- the loop -----------------------------------------------------------------------------------------

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
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device)
        if fingerprint and state.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {ckpt} was written by another configuration; fix: use a new run dir "
                             f"(hydra.run.dir / hydra.sweep.dir) or delete {ckpt_dir}")
        resumed_from = state["step"]
        tracker.rewind(resumed_from)
        log.info("resuming from %s (step %d of %d)", ckpt, resumed_from, total)
    else:
        if cfg.head_first_steps:
            probe_head(model.to(device), data, cfg, device, seed)
        if 0 in weight_steps and world.is_main:
            save_weights(model, list(weight_names), ckpt_dir, 0)
    net = world.wrap(model, device)  # the module that runs the forward: DDP when distributed

    started = time.time()
    lengths = [len(x) for x in data.train["input_ids"]] if cfg.group_by_length else None
    batches = batch_order(len(data.train), cfg.batch_size, seed, start=state["step"], lengths=lengths)
    generations: list = []
    model.train()
    bar = _progress(cfg, total, state["step"])
    while state["step"] < total:
        step = state["step"] + 1
        indices = world.shard(next(batches))
        for m in range(0, len(indices), micro):  # grad_accum micro-batches
            batch = {k: v.to(device) for k, v in collate(data.train[indices[m:m + micro]], data.pad_id,
                                                          data.kind).items()}
            with world.no_sync(net, last_micro_batch=m + micro >= len(indices)):
                with autocast(device, cfg.precision):
                    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = loss_fn(logits, batch["labels"], data.kind, cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingFailed(f"loss is {loss.item()} at step {step}", step)
                (loss / cfg.grad_accum).backward()
            state["loss_sum"] += loss.item() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["loss_count"] += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == total:
            mean = world.mean(state["loss_sum"] / state["loss_count"])
            tracker.log({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0], "train/epoch":
                         step * cfg.batch_size / len(data.train)}, step)
            bar.set_postfix(loss=f"{mean:.4f}")
            state["loss_sum"], state["loss_count"] = 0.0, 0
        if ((cfg.eval_every and step % cfg.eval_every == 0) or step == total) and world.is_main:
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
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total:
            state["wall_time_s"] += time.time() - started
            started = time.time()
            if world.is_main:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state)
            world.barrier()  # no rank runs ahead of the checkpoint it would resume from
    bar.close()
    state["wall_time_s"] += time.time() - started
    return FitResult(steps=total, final=state["final"], best=state["best"], resumed_from=resumed_from,
                     wall_time_s=state["wall_time_s"], generations=generations)


def _write_generations(out_dir: Path, step: int, generations: list[dict]) -> None:
    """generations/step{N}.jsonl for every evaluation; generations.jsonl is the latest (the final one)."""
    folder = out_dir / "generations"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    (folder / f"step{step}.jsonl").write_text(text)
    write_text(out_dir / GENERATIONS, text)

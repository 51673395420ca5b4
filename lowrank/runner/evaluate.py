"""Evaluation: the eval loss and the task's metric, in batches, reading the GPU once per evaluation.

Classification: batches of ``eval_batch_size`` sentences sorted by length (they pad little), the loss
summed and the predicted classes gathered on the device, read back once at the end and put back in
dataset order. Generation: the eval loss the same way (each MR with its first reference), then every
prompt decoded by ``model.generate`` in left-padded batches (greedy, or beam search with
``task.generation.num_beams``) with the KV cache, and corpus BLEU against all references.

Evaluation runs the blocks eagerly even when training compiled them (``accel.eager``): its shapes
(every eval batch, every decoding position) would each need their own compiled graph.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.runner import accel
from lowrank.runner.data import TaskData, collate, left_pad
from lowrank.runner.loss import autocast, loss_fn
from lowrank.runner.metrics import accuracy, corpus_bleu, matthews_corrcoef


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, task, cfg, device: torch.device) -> tuple[dict, list]:
    """``({"eval/<metric>": value}, generations)`` on the eval set; the model is left in eval mode."""
    model.eval()
    ev = data.eval
    ids, labels = ev["input_ids"], ev["labels"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    predicted = []
    with accel.eager(model):
        for start in range(0, len(order), cfg.eval_batch_size):
            indices = order[start:start + cfg.eval_batch_size]
            batch = collate(ev[indices], data.pad_id, data.kind, device=device)
            with autocast(device, cfg.precision):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += loss_fn(logits, batch["labels"], data.kind) * len(indices)
            if data.kind == "classification":
                predicted.append(logits.argmax(-1))
    metrics = {"eval/loss": loss_sum.item() / max(len(order), 1)}  # the one read of this evaluation
    if data.kind == "classification":
        by_order = torch.cat(predicted).tolist() if predicted else []
        predictions = [0] * len(order)
        for i, p in zip(order, by_order):
            predictions[i] = p
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
    eos = model.generation_config.eos_token_id
    with accel.eager(model):
        for start in range(0, len(data.prompts), cfg.eval_batch_size):
            prompts = data.prompts[start:start + cfg.eval_batch_size]
            batch = {k: v.to(device) for k, v in left_pad(prompts, data.pad_id).items()}
            with autocast(device, cfg.precision):
                ids = model.generate(**batch, max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams,
                                     length_penalty=gen.length_penalty, do_sample=False, use_cache=True,
                                     no_repeat_ngram_size=gen.no_repeat_ngram_size, pad_token_id=data.pad_id,
                                     eos_token_id=eos)
            for i, row in enumerate(ids[:, batch["input_ids"].shape[1]:].tolist()):
                text = data.decode(row).strip()
                # E2E references are one line: a description ends at the first line break (the model may go on)
                out.append({"mr": data.sources[start + i], "prediction": text.split("\n")[0].strip(),
                            "references": data.references[start + i]})
    return out

"""The usual stack for the same job as ``python run.py``: HF ``Trainer`` + PEFT, written as a user would.

Same model folder, data files, tokenisation (truncation at ``--max-len``), batch, steps, optimizer
(AdamW, lr, weight decay 0.01, linear schedule with 6 % warm-up, clipping at 1.0), evaluation points,
bf16 and seed as ``run.py``'s defaults; LoRA/DoRA through ``peft.LoraConfig`` (α, r, targets, no dropout
for the causal LM, 0 for both to match) with the classification head trained (``modules_to_save``).
``group_by_length`` as the runner. Writes one JSON: median step time (host-synced every 10 steps), run
wall, time from process start to the first finished step, GPU peak memory, the final metric.

    python -m benchmarks.hf_trainer --task sst2 --model $LOWRANK_MINILM_BF16 --out hf.json

The peers of ``benchmarks/peers.py`` are this script with one switch each: ``--liger`` (Liger-Kernel through
``use_liger_kernel``), ``--compile`` (``torch_compile=True``), ``--qlora`` (the base loaded in NF4 with double
quantisation and bf16 compute through bitsandbytes, as QLoRA; no gradient checkpointing, as every case here).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

#: our paper names -> PEFT target_modules (suffix match on module names)
TARGETS = {"bert": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"},
           "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}}


def sst2(data_dir: Path, tok, max_len: int):
    def read(name):
        rows = [line.split(" ", 1) for line in (data_dir / "sst2" / name).read_text().splitlines() if line.strip()]
        enc = tok([t.strip() for _, t in rows], truncation=True, max_length=max_len)
        return [{"input_ids": ids, "labels": int(y)} for ids, (y, _) in zip(enc["input_ids"], rows)]
    return read("stsa.binary.train.txt"), read("stsa.binary.dev.txt")


def e2e(data_dir: Path, tok, max_len: int, max_eval: int):
    def read(name):
        return list(csv.DictReader((data_dir / "e2e_cleaned" / name).open(newline="")))

    def example(mr, ref):
        p = tok(f"{mr}\nDescription:")["input_ids"]
        t = tok(" " + ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": (p + t)[:max_len], "labels": ([-100] * len(p) + t)[:max_len]}
    train = [example(r["mr"], r["ref"]) for r in read("devel-fixed.no-ol.csv")]
    seen, ev = set(), []
    for r in read("test-fixed.csv"):
        if r["mr"] not in seen and len(ev) < max_eval:
            seen.add(r["mr"])
            ev.append(example(r["mr"], r["ref"]))
    return train, ev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("sst2", "e2e"), default="sst2")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=os.environ.get("LOWRANK_DATA_DIR"))
    p.add_argument("--adapter", choices=("lora", "dora"), default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8)
    p.add_argument("--targets", default="qv")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--pad-to", type=int, default=None, help="pad every batch to this width (fixed shapes)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=125)
    p.add_argument("--max-eval", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--liger", action="store_true", help="use_liger_kernel=True (Liger-Kernel)")
    p.add_argument("--compile", action="store_true", help="torch_compile=True")
    p.add_argument("--qlora", action="store_true", help="base in NF4 + double quantisation (bitsandbytes)")
    p.add_argument("--log-every", type=int, default=10, help="logging_steps: the training losses recorded")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    causal = args.task == "e2e"
    quant = {}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        quant["device_map"] = {"": 0}
    if causal:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, **quant)
        train, ev = e2e(Path(args.data), tok, args.max_len, args.max_eval)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, dtype=torch.bfloat16)
        train, ev = sst2(Path(args.data), tok, args.max_len)
    family = "llama" if causal else "bert"
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, use_dora=args.adapter == "dora",
                        target_modules=[TARGETS[family][t] for t in args.targets],
                        modules_to_save=None if causal else ["classifier"],
                        task_type="CAUSAL_LM" if causal else "SEQ_CLS")
    model = get_peft_model(model, config)

    pad = DataCollatorWithPadding(tok, padding="max_length" if args.pad_to else "longest", max_length=args.pad_to)

    def collate(rows):
        batch = pad([{"input_ids": r["input_ids"]} for r in rows])
        if causal:
            width = batch["input_ids"].shape[1]
            batch["labels"] = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        else:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch

    marks: list[float] = []
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1 or state.global_step % 10 == 0:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.append((state.global_step, time.time()))

    import inspect

    fields = inspect.signature(TrainingArguments).parameters
    grouping = ({"group_by_length": True} if "group_by_length" in fields else
                {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields else {})
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_trainer_"), per_device_train_batch_size=args.batch, per_device_eval_batch_size=128,
        max_steps=args.steps, learning_rate=args.lr, weight_decay=0.01, warmup_steps=int(0.06 * args.steps),
        lr_scheduler_type="linear", max_grad_norm=1.0, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=args.seed, logging_steps=args.log_every,
        use_liger_kernel=args.liger, torch_compile=args.compile,
        eval_strategy="steps", eval_steps=args.eval_every, save_strategy="no", report_to=[],
        **grouping, dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True, label_names=["labels"])

    def metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=ev, data_collator=collate,
                      compute_metrics=None if causal else metrics, callbacks=[Clock()])
    started = time.time()
    trainer.train()
    final = trainer.evaluate()
    wall = time.time() - started
    windows = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks[1:], marks[2:])]
    out = {"impl": "hf-trainer+peft", "task": args.task, "adapter": args.adapter, "rank": args.rank,
           "targets": args.targets, "batch": args.batch, "steps": args.steps,
           "step_time_s": statistics.median(windows) if windows else None,
           "first_step_s": marks[0][1] - PROCESS_START if marks else None,
           "run_wall_s": wall, "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
           "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}, "train_losses": losses,
           "liger": args.liger, "compile": args.compile, "qlora": args.qlora,
           "process_s": time.time() - PROCESS_START}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

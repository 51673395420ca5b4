"""What ``gpu_step.py`` holds its variants to.

Agreement: each variant's first step (no optimizer step) gives the loss, the final hidden states and
every adapter gradient; ``compare`` measures them against a float32 reference (PEFT's model cast to
float32 for LoRA/DoRA, ours for FLoRA), and ``agreement_verdict`` accepts a variant whose error is at
most 1.5× PEFT's own bf16 error (+ a small floor), so speed never comes from doing less.
Performance: ``performance_checks`` evaluates the step-time, memory and MFU bars on the rows.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from benchmarks.step_variants import Variant, adapter_grads
from lowrank.runner import accel


class HiddenProbe:
    """Captures the final hidden states (output of the last norm / last encoder block)."""

    def __init__(self, model: nn.Module, family: str):
        lm = accel.unwrap(model)
        target = lm.get_decoder().norm if family == "llama" else accel.repeated_blocks(lm)[-1]
        self.value = None
        self.handle = target.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.value = out.detach().float()

    def close(self):
        self.handle.remove()


def check_step(model: nn.Module, layers: dict, v: Variant, loss_fn, batch: dict, family: str) -> dict:
    """One forward + backward without an optimizer step: loss, final hidden states, adapter grads."""
    probe = HiddenProbe(model, family)
    try:
        loss = loss_fn(model, batch)
        loss.backward()
    finally:
        probe.close()
    result = {"loss": float(loss.detach()), "hidden": probe.value, "grads": adapter_grads(layers, v)}
    for p in model.parameters():
        p.grad = None
    return result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def compare(got: dict, ref: dict) -> dict:
    keys = sorted(ref["grads"])
    missing = [k for k in keys if k not in got["grads"]]
    if missing:
        return {"error": f"{len(missing)} adapter gradients missing, e.g. {missing[0]}"}
    num = sum(float((got["grads"][k] - ref["grads"][k]).norm() ** 2) for k in keys)
    den = sum(float(ref["grads"][k].norm() ** 2) for k in keys)
    per = [rel(got["grads"][k], ref["grads"][k]) for k in keys]
    return {
        "loss_abs": abs(got["loss"] - ref["loss"]),
        "hidden_rel": rel(got["hidden"], ref["hidden"]),
        "grad_rel": math.sqrt(num / max(den, 1e-30)),
        "grad_rel_max": max(per) if per else 0.0,
        "grad_rel_median": statistics.median(per) if per else 0.0,
        "n_grads": len(keys),
    }


def agreement_verdict(vs_ref: dict, peft_vs_ref: dict | None, dtype: torch.dtype) -> bool:
    """Within bf16 tolerance: no worse than PEFT's own bf16 run is against the float32 reference
    (×1.5 + a small floor); without a PEFT counterpart, absolute bounds for bf16."""
    if "error" in vs_ref:
        return False
    if dtype == torch.float32:
        return vs_ref["hidden_rel"] < 1e-4 and vs_ref["grad_rel"] < 1e-3
    if peft_vs_ref and "error" not in peft_vs_ref:
        return all(vs_ref[k] <= 1.5 * peft_vs_ref[k] + floor for k, floor in
                   (("hidden_rel", 2e-3), ("grad_rel", 5e-3), ("loss_abs", 2e-3)))
    return vs_ref["hidden_rel"] < 3e-2 and vs_ref["grad_rel"] < 6e-2 and vs_ref["loss_abs"] < 2e-2


def _find(rows, impl, adapter, base, rank, targets):
    for r in rows:
        if (r["impl"], r["adapter"], r["base"], r["rank"], r["targets"]) == (impl, adapter, base, rank, targets) \
                and r["status"] == "ok":
            return r
    return None


def mem(row: dict) -> float | None:
    """The memory the checks compare: peak reserved (it includes CUDA-graph pools, which the
    allocated counter does not see once graphs replay), else peak allocated."""
    return row.get("peak_reserved_gib") or row.get("peak_mem_gib")


def performance_checks(result: dict) -> list[dict]:
    """The bars the rows are held to: our LoRA's step time and memory against PEFT's (plain and with the
    same base speed-ups), our DoRA against our LoRA and PEFT's DoRA, MFU on the 1.1 B model, and every
    variant's agreement with the float32 reference."""
    rows, fast = result["rows"], result["fast_base"]
    big = result["preset"] == "llama1b"
    lora_bound = 0.75 if big else 1.0
    ours_base = fast if result["device_kind"] == "cuda" else "plain"
    out = []
    settings = sorted({(r["rank"], r["targets"]) for r in rows})
    for rank, targets in settings:
        tag = f"r={rank} {targets}"
        ol = _find(rows, "ours", "lora", ours_base, rank, targets)
        od = _find(rows, "ours", "dora", ours_base, rank, targets)
        pl = _find(rows, "peft", "lora", "plain", rank, targets)
        pd = _find(rows, "peft", "dora", "plain", rank, targets)
        plf = _find(rows, "peft", "lora", fast, rank, targets)
        pdf = _find(rows, "peft", "dora", fast, rank, targets)

        def add(name, value, bound, ok, note=""):
            out.append({"setting": tag, "check": name, "value": value, "bound": bound, "ok": bool(ok),
                        "note": note})

        if ol and pl:
            ratio = ol["step_ms"] / pl["step_ms"]
            add("ours LoRA / PEFT LoRA (plain) step time", round(ratio, 3), f"<= {lora_bound}", ratio <= lora_bound)
            if mem(ol) is not None:
                add("ours LoRA peak reserved mem <= PEFT LoRA (plain)", round(mem(ol), 2),
                    f"<= {mem(pl):.2f}", mem(ol) <= mem(pl))
        if ol and plf and plf is not ol:
            ratio = ol["step_ms"] / plf["step_ms"]
            add(f"ours LoRA / PEFT LoRA (same base: {fast}) step time", round(ratio, 3), "<= 1.0", ratio <= 1.0,
                "adapter-only gain")
        if od and ol:
            ratio = od["step_ms"] / ol["step_ms"]
            add("ours DoRA / ours LoRA step time", round(ratio, 3), "<= 1.08", ratio <= 1.08)
        if od and pd:
            add("ours DoRA step time < PEFT DoRA (plain)", round(od["step_ms"], 2), f"< {pd['step_ms']:.2f}",
                od["step_ms"] < pd["step_ms"])
            if mem(od) is not None:
                add("ours DoRA peak reserved mem < PEFT DoRA (plain)", round(mem(od), 2),
                    f"< {mem(pd):.2f}", mem(od) < mem(pd))
        if od and pdf and pdf is not od:
            add(f"ours DoRA step time < PEFT DoRA (same base: {fast})", round(od["step_ms"], 2),
                f"< {pdf['step_ms']:.2f}", od["step_ms"] < pdf["step_ms"])
            if mem(od) is not None:
                add(f"ours DoRA peak reserved mem < PEFT DoRA (same base: {fast})", round(mem(od), 2),
                    f"< {mem(pdf):.2f}", mem(od) < mem(pdf))
        if big and ol and ol["mfu"] is not None:
            add("ours LoRA MFU (4NT / measured ceiling)", round(ol["mfu"], 3), ">= 0.45", ol["mfu"] >= 0.45)
    for r in rows:
        if r["agreement"].get("ok") is False:
            out.append({"setting": f"r={r['rank']} {r['targets']}", "check": f"agreement {r['variant']}",
                        "value": r["agreement"].get("vs_fp32"), "bound": "bf16 tolerance", "ok": False, "note": ""})
    agreed = [r for r in rows if "ok" in r["agreement"]]
    out.append({"setting": "all", "check": "agreement with the float32 reference within bf16 tolerance",
                "value": f"{sum(r['agreement']['ok'] for r in agreed)}/{len(agreed)} variants", "bound": "all",
                "ok": bool(agreed) and all(r["agreement"]["ok"] for r in agreed), "note": ""})
    return out

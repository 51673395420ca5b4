"""Training-step benchmark: our LoRA, DoRA and FLoRA against PEFT's LoRA and DoRA, side by side.

The harness: one process, one base model per preset (same config, dtype, seed, data), every variant a
fresh deep copy of it (``benchmarks/step_variants.py`` builds them, ``benchmarks/step_checks.py`` holds
them to the float32 reference and the performance bars). A variant is ``impl:adapter:base``
(``ours``/``peft``, ``lora``/``dora``/``flora``) and ``base`` is what the frozen base model gets,
identical for both impls —
  ``plain`` (eager transformers, the model's own loss), ``fused`` (eager, fused linear
  cross-entropy: ``lowrank.runner.accel.causal_lm_loss``), ``liger`` (Liger RMSNorm/SwiGLU/RoPE + fused loss),
  ``compile`` (``lowrank.runner.accel.compile``: regional torch.compile of the blocks + fused loss),
  ``liger+compile``.

For every (rank, targets) setting and adapter, one set of adapter weights (seeded; B random, not zero,
so the update and its gradients are real) is loaded into every variant. Each variant's first step is
an agreement check (no optimizer step): loss, the final hidden states and all adapter gradients are
compared with a float32 reference (PEFT's model cast to float32 for LoRA/DoRA, ours for FLoRA) and
with PEFT's bf16 run, so speed never comes from doing less. Then warm-up and timed steps (forward +
backward + AdamW + zero_grad), median of CUDA-event times; peak memory over the timed steps
(``max_memory_allocated``, weights and optimizer state included); MFU = 4·N·tokens / step time / a
bf16 matmul ceiling measured in the same run (N: the frozen base's matmul parameters, embeddings
excluded, LM head included; attention's own FLOPs not counted).

    python -m benchmarks.gpu_step --preset llama1b --out benchmarks/results/llama1b_h100.json
    python -m benchmarks.gpu_step --preset minilm-cpu --steps 10 --out benchmarks/results/minilm_cpu.json
    python -m benchmarks.gpu_step --preset tiny-llama --device cpu --steps 2     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.step_checks import (  # noqa: E402
    _find, agreement_verdict, check_step, compare, performance_checks)
from benchmarks.step_variants import (  # noqa: E402
    PRESETS, Variant, apply_adapter, base_tokens, build_base, build_variant, canonical_weights,
    make_batch, matmul_params)
from experiments.portable import portable  # noqa: E402
from lowrank.runner import accel  # noqa: E402

@dataclass
class Row:
    preset: str
    variant: str
    impl: str
    adapter: str
    base: str
    rank: int
    targets: str
    status: str = "ok"
    error: str | None = None
    step_ms: float | None = None
    step_ms_p10: float | None = None
    step_ms_p90: float | None = None
    tokens_per_s: float | None = None
    peak_mem_gib: float | None = None       # max_memory_allocated over the variant's life
    peak_reserved_gib: float | None = None  # max_memory_reserved: what the process held (CUDA-graph pools too)
    mfu: float | None = None
    first_step_s: float | None = None
    trainable_params: int | None = None
    agreement: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# timing

def time_steps(model, loss_fn, batch, device, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step():
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0  # the first step (compilation included unless a check step ran first)
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    else:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        peak = reserved = None
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * (len(times) - 1) + 0.5))]  # noqa: E731
    del opt
    return {"step_ms": statistics.median(times), "step_ms_p10": q(0.1), "step_ms_p90": q(0.9),
            "peak_mem_gib": peak, "peak_reserved_gib": reserved, "first_step_s": first, "trainable_params": sum(p.numel() for p in params)}


def time_interleaved(entries, batch, device, warmup: int, steps: int) -> list[dict]:
    """Time several variants step by step in rotation (A B C, B C A, ...), so that a shared, busy
    machine slows them alike: host-timed, for the CPU presets."""
    opts, step_fns = [], []
    for model, loss_fn in entries:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        opts.append((opt, sum(p.numel() for p in params)))

        def step(model=model, loss_fn=loss_fn, opt=opt):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_fns.append(step)
    first = []
    for step in step_fns:
        t = time.perf_counter()
        step()
        first.append(time.perf_counter() - t)
    for _ in range(max(0, warmup - 1)):
        for step in step_fns:
            step()
    times = [[] for _ in step_fns]
    n = len(step_fns)
    for i in range(steps):
        for j in range(n):
            k = (i + j) % n
            t = time.perf_counter()
            step_fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    out = []
    for ts, f, (_, count) in zip(times, first, opts):
        ts.sort()
        q = lambda x, ts=ts: ts[min(len(ts) - 1, int(x * (len(ts) - 1) + 0.5))]  # noqa: E731
        out.append({"step_ms": statistics.median(ts), "step_ms_p10": q(0.1), "step_ms_p90": q(0.9),
                    "peak_mem_gib": None, "peak_reserved_gib": None, "first_step_s": f, "trainable_params": count})
    return out


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 30) -> float:
    """Measured dense matmul rate (FLOP/s) on random data, median of ``reps`` products."""
    if device.type != "cuda":
        n = min(n, 1024)
    g = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(3)]
    for _ in range(3):
        mats[0] @ mats[1]
    times = []
    for i in range(reps):
        a, b = mats[i % 3], mats[(i + 1) % 3]
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib import metadata

    for name in ("transformers", "peft", "triton", "liger-kernel"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        env["device"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


# ---------------------------------------------------------------------------------------------------
# the run

def default_variants(preset: dict, fast: str) -> list[str]:
    if preset["device"] == "cpu":
        return ["peft:lora:plain", "ours:lora:plain", "peft:dora:plain", "ours:dora:plain", "ours:flora:plain"]
    return ["peft:lora:plain", f"peft:lora:{fast}", "ours:lora:plain", f"ours:lora:{fast}",
            "peft:dora:plain", f"peft:dora:{fast}", f"ours:dora:{fast}", f"ours:flora:{fast}"]


def run(args) -> dict:
    preset = dict(PRESETS[args.preset])
    if args.batch:
        preset["batch"] = args.batch
    if args.seq:
        preset["seq"] = args.seq
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} wants a GPU; pass --device cpu for a smoke run")
    dtype = getattr(torch, args.dtype or preset["dtype"])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = [Variant.parse(s) for s in (args.variants or default_variants(preset, args.fast))]
    target_sets = [list(t) for t in args.targets]
    env = environment(device)
    print(json.dumps(env), flush=True)

    ceiling = matmul_ceiling(device, dtype)
    print(f"matmul ceiling ({dtype}): {ceiling / 1e12:.1f} TFLOP/s", flush=True)
    base, source = build_base(preset, device, dtype)
    n_matmul = matmul_params(base)
    batch = make_batch(preset, base, device)
    tokens = preset["batch"] * preset["seq"]
    flops_per_step = 4 * n_matmul * tokens
    print(f"{args.preset}: {source}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"N(matmul)={n_matmul / 1e6:.1f}M, batch {preset['batch']}x{preset['seq']}, {dtype}", flush=True)

    rows: list[Row] = []
    for rank in args.ranks:
        for targets in target_sets:
            by_adapter: dict[str, list[Variant]] = {}
            for v in variants:
                by_adapter.setdefault(v.adapter, []).append(v)
            for adapter, vs in by_adapter.items():
                ref_impl = "peft" if adapter in ("lora", "dora") else "ours"
                ref_v = Variant(ref_impl, adapter, "plain")
                # the adapter weights every variant of this (rank, targets, adapter) starts from
                probe_model = copy.deepcopy(base)
                weights = canonical_weights(base, ref_v, rank,
                                            apply_adapter(probe_model, Variant("ours", adapter, "plain"),
                                                          preset["family"], rank, targets))
                del probe_model
                free(device)
                ref = peft_bf16 = peft_ref = None
                if not args.no_check:
                    try:
                        ref = reference(base, ref_v, preset, rank, targets, weights, batch, device)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  reference failed: {exc!r}", flush=True)
                        traceback.print_exc()
                    free(device)
                pending = []  # --interleave: (row, model, loss_fn) timed together after the checks
                for v in vs:
                    row = Row(args.preset, v.name, v.impl, v.adapter, v.base, rank, "".join(targets))
                    model = None
                    kept = False
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()  # the variant's whole life: CUDA-graph pools included
                    try:
                        model, layers, loss_fn = build_variant(base, v, preset, rank, targets, weights)
                        if ref is not None:
                            t0 = time.perf_counter()
                            got = check_step(model, layers, v, loss_fn, batch, preset["family"])
                            first_call = time.perf_counter() - t0
                            row.agreement["vs_fp32"] = compare(got, ref)
                            if v.impl == "peft" and v.base == "plain":
                                peft_bf16, peft_ref = got, row.agreement["vs_fp32"]
                                row.agreement["vs_peft"] = {"same": True}
                            elif peft_bf16 is not None:
                                row.agreement["vs_peft"] = compare(got, peft_bf16)
                            row.agreement["ok"] = agreement_verdict(row.agreement["vs_fp32"], peft_ref, dtype)
                            del got
                        if args.interleave:
                            pending.append((row, model, loss_fn))
                            kept = True
                            continue
                        t = time_steps(model, loss_fn, batch, device, args.warmup, args.steps)
                        for k, val in t.items():
                            setattr(row, k, val)
                        if ref is not None:
                            row.first_step_s = first_call  # the first forward+backward (compilation included)
                        row.tokens_per_s = tokens / (row.step_ms / 1e3)
                        if device.type == "cuda":
                            row.mfu = flops_per_step / (row.step_ms / 1e3) / ceiling
                    except torch.cuda.OutOfMemoryError as exc:
                        row.status, row.error = "oom", str(exc).splitlines()[0]
                    except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the run
                        row.status, row.error = "error", f"{type(exc).__name__}: {exc}"[:500]
                        traceback.print_exc()
                    finally:
                        if not kept:
                            del model
                            if "compile" in base_tokens(v.base):
                                torch._dynamo.reset()
                            free(device)
                    if kept:
                        continue
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.partial:
                        Path(args.partial).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
                    if args.profile and v.name in args.profile:
                        profile(base, v, preset, rank, targets, weights, batch, device, args)
                if pending:
                    timed = time_interleaved([(m, f) for _, m, f in pending], batch, device, args.warmup, args.steps)
                    for (row, _, _), t in zip(pending, timed):
                        for k, val in t.items():
                            setattr(row, k, val)
                        row.tokens_per_s = tokens / (row.step_ms / 1e3)
                        rows.append(row)
                        print(format_row(row), flush=True)
                    pending.clear()
                del ref, peft_bf16
                free(device)

    result = {
        "preset": args.preset, "preset_config": {k: v for k, v in preset.items()},
        "model_source": source, "dtype": str(dtype).replace("torch.", ""), "device_kind": device.type,
        "environment": env, "matmul_ceiling_tflops": ceiling / 1e12, "matmul_params": n_matmul,
        "tokens_per_step": tokens, "flops_per_step_4NT": flops_per_step,
        "warmup": args.warmup, "steps": args.steps, "fast_base": args.fast,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_step", *sys.argv[1:]]),
        "rows": [asdict(r) for r in rows],
    }
    result["checks"] = performance_checks(result)
    return result


def reference(base, ref_v: Variant, preset, rank, targets, weights, batch, device) -> dict:
    """The float32 reference run: the reference impl's model (PEFT for LoRA/DoRA) cast to float32."""
    model, layers, loss_fn = build_variant(base, ref_v, preset, rank, targets, weights)
    model.float()
    # recomputation changes nothing numerically and keeps float32 activations of a 1B model in memory
    lm = accel.unwrap(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = check_step(model, layers, ref_v, loss_fn, batch, preset["family"])
    del model, layers
    return got


def profile(base, v, preset, rank, targets, weights, batch, device, args) -> None:
    """Top kernels of a few steps of one variant (torch.profiler), printed and saved."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    model, layers, loss_fn = build_variant(base, v, preset, rank, targets, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=70)
    print(f"--- profile {v.name} r={rank} {''.join(targets)} (3 steps) ---\n{table}", flush=True)
    if args.out:  # beside the result JSON
        name = f"profile_{v.name.replace(':', '_').replace('+', '-')}_r{rank}_{''.join(targets)}.txt"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name(name).write_text(table)
    del model, layers, opt
    if "compile" in base_tokens(v.base):
        torch._dynamo.reset()
    free(device)


# ---------------------------------------------------------------------------------------------------
# printing

def format_row(r: Row | dict) -> str:
    d = asdict(r) if isinstance(r, Row) else r
    if d["status"] != "ok":
        return f"  r={d['rank']:<3} {d['targets']:<5} {d['variant']:<26} {d['status']}: {d['error']}"
    ag = d["agreement"].get("vs_fp32", {})
    agree = (f"grad {ag['grad_rel']:.1e} hid {ag['hidden_rel']:.1e}" if "grad_rel" in ag else "-")
    mem = f"{d['peak_mem_gib']:.2f}" if d["peak_mem_gib"] is not None else "-"
    mfu = f"{100 * d['mfu']:.1f}%" if d["mfu"] is not None else "-"
    return (f"  r={d['rank']:<3} {d['targets']:<5} {d['variant']:<26} {d['step_ms']:8.2f} ms "
            f"{d['tokens_per_s']:10.0f} tok/s  mem {mem:>6} GiB  MFU {mfu:>6}  first {d['first_step_s']:.1f}s  "
            f"{agree} {'ok' if d['agreement'].get('ok') else ('-' if not d['agreement'] else 'FAIL')}")


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"| rank | targets | variant | step ms (p10–p90) | tokens/s | peak GiB alloc / reserved | MFU | vs PEFT plain | "
             f"grad rel err vs fp32 | agrees |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['rank']} | {r['targets']} | {r['variant']} | {r['status']} | | | | | | |")
            continue
        pl = _find(rows, "peft", r["adapter"] if r["adapter"] != "flora" else "lora", "plain", r["rank"],
                   r["targets"])
        ratio = f"{r['step_ms'] / pl['step_ms']:.2f}×" if pl else "-"
        ag = r["agreement"].get("vs_fp32", {})
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} / {r.get('peak_reserved_gib') or 0:.2f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        err = f"{ag['grad_rel']:.1e}" if "grad_rel" in ag else "-"
        lines.append(
            f"| {r['rank']} | {r['targets']} | {r['variant']} | {r['step_ms']:.1f} ({r['step_ms_p10']:.1f}–"
            f"{r['step_ms_p90']:.1f}) | {r['tokens_per_s']:,.0f} | {mem} | {mfu} | {ratio} | {err} | "
            f"{r['agreement'].get('ok', '-')} |")
    lines.append("")
    lines.append("| check | setting | value | bound | ok |")
    lines.append("|---|---|---|---|---|")
    for c in result["checks"]:
        lines.append(f"| {c['check']} | {c['setting']} | {c['value']} | {c['bound']} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama1b", choices=sorted(PRESETS))
    p.add_argument("--device", default=None, help="override the preset's device (cpu for a smoke run)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--targets", nargs="+", default=["qv", "qkvo"], help="target sets as letters, e.g. qv qkvo")
    p.add_argument("--variants", nargs="+", default=None, help="impl:adapter:base, e.g. ours:lora:compile")
    p.add_argument("--fast", default="compile", help="the base speed-up our headline uses (see BASES)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-check", action="store_true", help="skip the agreement checks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier when other processes share the cores)")
    p.add_argument("--interleave", action="store_true",
                   help="time a setting's variants in rotation, step by step (for a shared CPU)")
    p.add_argument("--profile", nargs="*", default=None, help="variants to profile (torch.profiler)")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--out", default=None, help="write the JSON here (and to $OUT if set)")
    p.add_argument("--partial", default=None, help="rewrite the rows so far to this file after each variant")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only (tests call main in-process)
    text = table(result)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(portable(result), indent=1, default=str))
    return 0 if all(c["ok"] for c in result["checks"] if "informational" not in c["note"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The run directory: what a run writes, under which names, and how runs are found again.

One Hydra job writes one run directory::

    result.json          status, metrics, resolved config, counts, times; written atomically, last
    metrics.jsonl        one JSON object per logged step
    adapter/             the trained parameters (``lowrank.save_adapter``)
    checkpoints/         the latest resume checkpoint ``step-N/`` and ``weights-step{N}.safetensors``
    generations.jsonl    generated text of a generation task (its last evaluation)
    attempts.json        every process that worked on the run (host, pid, start and end in unix time,
                         whether it resumed): a resumed run's wall time covers the attempts since the
                         last one that started from step 0
    .lock                held (``fcntl.flock``) by the one process that owns the run while it runs;
                         the kernel releases it when that process ends, however it ends

``result.json`` of a completed run lists the size and sha256 of every file it vouches for (the adapter's
files and the weight trajectory): ``vouched_damage`` says which one changed since, so a damaged run is
run again rather than skipped. Non-finite numbers are written as ``null`` with the reason under
``null_reasons`` (the file is strict JSON).

A sweep directory holds one run directory per job and ``aggregate.csv`` / ``aggregate.parquet``.
Everything else (the app, the loop, the tracker, the results API, the analyses) takes these names
and helpers from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from lowrank.atomic import write_json

RESULT = "result.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
GENERATIONS = "generations.jsonl"
ATTEMPTS = "attempts.json"
AGGREGATE = "aggregate"
HYDRA_CONFIG = ".hydra/config.yaml"
LOCK = ".lock"
WEIGHTS_FILE = re.compile(r"weights-step(\d+)\.safetensors$")
#: Folders inside a run directory that never hold a run of their own.
INSIDE_A_RUN = (ADAPTER, CHECKPOINTS, "wandb", "generations")


class BrokenResult(ValueError):
    """A result.json that exists but cannot be read (truncated by a crash or a full disk)."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock; the message (one line) names it."""


@contextmanager
def owned(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block: one process works on a run directory at a time.

    The lock is ``fcntl.flock`` on ``<run_dir>/.lock``, so the kernel drops it when the holder exits, is
    killed or its machine's NFS client loses it: a dead run never leaves a stale lock. Raises ``RunDirBusy``
    naming the holder (host, pid, since when) at once, without waiting, when another process holds it.
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunDirBusy(f"run dir {run_dir} is in use by {holder}; fix: wait for that run to end, or "
                             f"choose another hydra.run.dir / hydra.sweep.dir") from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {since}\n".encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


def weights_file(step: int) -> str:
    return f"weights-step{step}.safetensors"


def read_result(run_dir: str | Path) -> dict | None:
    """``result.json`` of ``run_dir`` as a dict; ``None`` if the run has not finished.

    Raises ``BrokenResult`` (naming the file) when the file exists but is not a JSON object.
    """
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BrokenResult(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(result, dict):
        raise BrokenResult(f"{path} holds a {type(result).__name__}, not a result object")
    return result


def write_result(run_dir: str | Path, result: dict) -> Path:
    """Write ``result.json`` atomically (readers never see half of it) as strict JSON: a NaN or infinite
    number becomes ``null``, and ``null_reasons`` names its key and what it was."""
    reasons: dict[str, str] = {}
    result = _finite(result, "", reasons)
    if reasons:
        result["null_reasons"] = {**result.get("null_reasons", {}), **reasons}
    return write_json(Path(run_dir) / RESULT, result, allow_nan=False)


def _finite(value, key: str, reasons: dict):
    if isinstance(value, float) and not math.isfinite(value):
        reasons[key] = f"not a finite number ({value})"
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{key}.{k}" if key else str(k), reasons) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{key}[{i}]", reasons) for i, v in enumerate(value)]
    return value


def vouched_files(run_dir: str | Path) -> dict[str, dict]:
    """``{path relative to run_dir: {"size", "sha256"}}`` for the files a completed result vouches for:
    everything under ``adapter/`` and the weight trajectory ``checkpoints/weights-step*.safetensors``."""
    run_dir = Path(run_dir)
    paths = [p for p in (run_dir / ADAPTER).rglob("*") if p.is_file()]
    paths += [p for p in (run_dir / CHECKPOINTS).glob("weights-step*.safetensors") if WEIGHTS_FILE.search(p.name)]
    return {p.relative_to(run_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(paths)}


def vouched_damage(run_dir: str | Path, result: dict) -> str | None:
    """The first file ``result["files"]`` vouches for that is missing or differs in size or sha256, as one
    phrase naming it; None when all are whole (or the result lists none)."""
    run_dir = Path(run_dir)
    for rel, want in (result.get("files") or {}).items():
        path = run_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{rel} has {size} bytes, not the {want.get('size')} result.json vouches for"
        if _sha256(path) != want.get("sha256"):
            return f"{rel} differs from the sha256 result.json vouches for"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_dirs(root: str | Path, *, finished_only: bool = False) -> list[Path]:
    """Every run directory at or below ``root``, sorted: folders holding a result.json or (unless
    ``finished_only``) Hydra's ``.hydra/config.yaml`` of a job that has not finished."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RESULT)}
    if not finished_only:
        found |= {p.parent.parent for p in root.rglob(HYDRA_CONFIG)}
    return sorted(p for p in found if not any(part in INSIDE_A_RUN for part in p.relative_to(root).parts))


def _last_write(run_dir: Path) -> float:
    """When a process last wrote the run's log or checkpoints (where a killed attempt stopped)."""
    paths = [run_dir / METRICS, *(run_dir / CHECKPOINTS).rglob("*")]
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def start_attempt(run_dir: str | Path, started: float, resumed: bool) -> list[dict]:
    """Record a process starting to work on ``run_dir``; return every attempt recorded, this one last.

    Every attempt stays in the file (host, pid, start, end, whether it resumed). One that was killed has no
    ``ended`` and is closed at the last time it wrote its log or a checkpoint.
    """
    run_dir = Path(run_dir)
    try:
        earlier = json.loads((run_dir / ATTEMPTS).read_text())
    except (OSError, ValueError):
        earlier = []
    earlier = [a for a in earlier if isinstance(a, dict) and "started" in a] if isinstance(earlier, list) else []
    for attempt in earlier:
        if attempt.get("ended") is None:
            attempt["ended"] = max(attempt["started"], _last_write(run_dir))
    attempts = [*earlier, {"started": started, "ended": None, "resumed": resumed, "host": socket.gethostname(),
                           "pid": os.getpid()}]
    write_json(run_dir / ATTEMPTS, attempts)
    return attempts


def counted(attempts: list[dict]) -> list[dict]:
    """The attempts whose time the run's result counts: the last one that started from step 0 (a run that
    starts over drops the earlier work) and every resumed attempt after it."""
    start = max((i for i, a in enumerate(attempts) if not a.get("resumed", True)), default=0)
    return attempts[start:]


def end_attempt(run_dir: str | Path, attempts: list[dict], ended: float | None = None) -> float:
    """Close this (last) attempt and return the wall time of the attempts that count, in seconds."""
    attempts[-1]["ended"] = time.time() if ended is None else ended
    write_json(Path(run_dir) / ATTEMPTS, attempts)
    return sum(a["ended"] - a["started"] for a in counted(attempts))

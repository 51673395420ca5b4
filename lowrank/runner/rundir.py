"""The run directory: what a run writes, under which names, and how runs are found again.

One Hydra job writes one run directory::

    result.json          status, metrics, resolved config, counts, times; written atomically, last
    metrics.jsonl        one JSON object per logged step
    adapter/             the trained parameters (``lowrank.save_adapter``)
    checkpoints/         the latest resume checkpoint ``step-N/`` and ``weights-step{N}.safetensors``
    generations.jsonl    generated text of a generation task (its last evaluation)
    attempts.json        start and end (unix time) of each process that worked on the run: a resumed
                         run's wall time covers them all

A sweep directory holds one run directory per job and ``aggregate.csv`` / ``aggregate.parquet``.
Everything else (the app, the loop, the tracker, the results API, the analyses) takes these names
and helpers from here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lowrank.atomic import write_json

RESULT = "result.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
GENERATIONS = "generations.jsonl"
ATTEMPTS = "attempts.json"
AGGREGATE = "aggregate"
HYDRA_CONFIG = ".hydra/config.yaml"
WEIGHTS_FILE = re.compile(r"weights-step(\d+)\.safetensors$")
#: Folders inside a run directory that never hold a run of their own.
INSIDE_A_RUN = (ADAPTER, CHECKPOINTS, "wandb", "generations")


class BrokenResult(ValueError):
    """A result.json that exists but cannot be read (truncated by a crash or a full disk)."""


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
    """Write ``result.json`` atomically: readers never see half of it."""
    return write_json(Path(run_dir) / RESULT, result)


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
    """Record a process starting to work on ``run_dir``; return every attempt that counts, this one last.

    A resumed run keeps its earlier attempts; one that was killed has no ``ended`` and is closed at the
    last time it wrote its log or a checkpoint. A run that starts over (no checkpoint) counts only itself.
    """
    run_dir = Path(run_dir)
    earlier: list = []
    if resumed:
        try:
            earlier = json.loads((run_dir / ATTEMPTS).read_text())
        except (OSError, ValueError):
            earlier = []
        earlier = [a for a in earlier if isinstance(a, dict) and "started" in a] if isinstance(earlier, list) else []
    for attempt in earlier:
        if attempt.get("ended") is None:
            attempt["ended"] = max(attempt["started"], _last_write(run_dir))
    attempts = [*earlier, {"started": started, "ended": None}]
    write_json(run_dir / ATTEMPTS, attempts)
    return attempts


def end_attempt(run_dir: str | Path, attempts: list[dict], ended: float) -> float:
    """Close this (last) attempt and return the wall time of all of them, in seconds."""
    attempts[-1]["ended"] = ended
    write_json(Path(run_dir) / ATTEMPTS, attempts)
    return sum(a["ended"] - a["started"] for a in attempts)

"""The run directory: what a run writes, under which names, and how runs are found again.

One Hydra job writes one run directory::

    result.json          status, metrics, resolved config, counts, times; written atomically, last
    metrics.jsonl        one JSON object per logged step
    adapter/             the trained parameters (``lowrank.save_adapter``)
    checkpoints/         the latest resume checkpoint ``step-N/`` and ``weights-step{N}.safetensors``
    generations.jsonl    generated text of a generation task (its last evaluation)

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


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / RESULT).is_file() or (path / HYDRA_CONFIG).is_file()


def run_dirs(root: str | Path, *, finished_only: bool = False) -> list[Path]:
    """Every run directory at or below ``root``, sorted: folders holding a result.json or (unless
    ``finished_only``) Hydra's ``.hydra/config.yaml`` of a job that has not finished."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RESULT)}
    if not finished_only:
        found |= {p.parent.parent for p in root.rglob(HYDRA_CONFIG)}
    return sorted(p for p in found if not any(part in INSIDE_A_RUN for part in p.relative_to(root).parts))

"""Where a run's numbers go: ``metrics.jsonl`` in the run dir always, Weights & Biases as a mirror.

``Tracker`` appends one JSON object per logged step to ``<run_dir>/metrics.jsonl`` (flushed at once, so a
killed run keeps what it logged; ``rewind(step)`` drops lines after a checkpoint before a resumed run logs
again). With ``logger=wandb`` it also mirrors config, metrics, summary and the adapter (as an artifact) to
W&B, in the mode ``logger.mode`` gives (``WANDB_MODE``, default offline; offline files go to
``<run_dir>/wandb/``). The W&B run id is derived from the run dir, so a resumed run continues the same W&B
run: online, W&B resumes it; offline (where W&B cannot append to an earlier file), the resumed attempt
replays the kept ``metrics.jsonl`` steps into its W&B run and removes the killed attempt's offline folder,
so the run dir holds one offline W&B run with the whole history. The adapter artifact is added with
W&B's ``immutable`` policy: nothing is staged outside the run dir. ``wandb`` is imported here only, lazily; if it fails to start or to log, the tracker warns once and
carries on with JSONL alone — a run never fails because of its mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from lowrank.atomic import write_text
from lowrank.runner.config import first_line
from lowrank.runner.rundir import METRICS

log = logging.getLogger(__name__)


def _clean(value):
    """JSON-safe scalar: NaN/inf become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """JSONL log of a run, mirrored to W&B when ``logger_cfg.name == "wandb"``."""

    def __init__(self, logger_cfg, run_dir: Path, *, config: dict, name: str, group: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.cfg = logger_cfg
        self._wandb = None
        self._warned = False
        if logger_cfg.name == "wandb" and logger_cfg.mode != "disabled":
            self._start_wandb(config, name, group)

    # ---- JSONL ---------------------------------------------------------------------------------------
    def log(self, metrics: dict, step: int) -> None:
        """Append ``{"step": step, "time": unix time, **metrics}`` and mirror it to W&B."""
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._mirror(lambda run: run.log(dict(metrics), step=step))

    def rewind(self, step: int) -> None:
        """Keep only records with ``step <= step`` (and drop a torn last line of a killed process)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                if record["step"] <= step:
                    kept.append((line, record))
            except (ValueError, KeyError):
                continue
        write_text(self.path, "".join(line + "\n" for line, _ in kept))
        if self._wandb is not None and self.cfg.mode == "offline":  # the earlier attempt's steps, into this run
            for _, record in kept:
                values = {k: v for k, v in record.items() if k not in ("step", "time")}
                self._mirror(lambda run, values=values, step=record["step"]: run.log(values, step=step))

    # ---- W&B -----------------------------------------------------------------------------------------
    def _start_wandb(self, config: dict, name: str, group: str) -> None:
        # quiet unless asked otherwise: wandb's own terminal lines follow WANDB_SILENT, read at its set-up
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            run_id = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
            self._run_id = run_id
            self._wandb = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=group, name=name, config=config,
                tags=list(self.cfg.tags), dir=str(self.run_dir), mode=self.cfg.mode, id=run_id, resume="allow",
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                        disable_code=True))
        except Exception as e:  # noqa: BLE001 - the mirror must never stop a run
            self._warn("start", e)
            return
        if self.cfg.mode == "offline":
            self._drop_earlier_offline_runs()

    def _drop_earlier_offline_runs(self) -> None:
        """Remove offline folders of this run id left by earlier (killed or restarted) attempts: what of
        them is kept comes back through ``rewind``'s replay of metrics.jsonl."""
        files = getattr(self._wandb, "dir", None)  # <run_dir>/wandb/offline-run-<time>-<id>/files
        if not files:
            return
        current = Path(files).resolve().parent
        for folder in (self.run_dir / "wandb").glob(f"offline-run-*-{self._run_id}"):
            if folder.resolve() != current:
                shutil.rmtree(folder, ignore_errors=True)

    def _mirror(self, action) -> None:
        if self._wandb is None:
            return
        try:
            action(self._wandb)
        except Exception as e:  # noqa: BLE001
            self._warn("log", e)

    def _warn(self, what: str, error: Exception) -> None:
        if not self._warned:
            log.warning("W&B failed to %s (%s: %s); going on with %s only", what, type(error).__name__,
                        first_line(error), METRICS)
            self._warned = True
        self._wandb = None if what == "start" else self._wandb

    def summary(self, values: dict) -> None:
        """Set the W&B run summary (the JSONL side is result.json, written by the experiment)."""
        self._mirror(lambda run: run.summary.update({k: _clean(v) for k, v in values.items()}))

    def log_artifact(self, folder: Path, name: str, kind: str = "adapter") -> None:
        if not self.cfg.log_adapter_artifact:
            return

        def upload(run):
            import wandb

            artifact = wandb.Artifact(name=name, type=kind)
            # immutable: W&B reads the files where they are instead of copying them to
            # ~/.local/share/wandb/artifacts/staging (the adapter folder is final when it is logged)
            artifact.add_dir(str(folder), policy="immutable")
            run.log_artifact(artifact)
        self._mirror(upload)

    def finish(self, failed: bool = False) -> None:
        if self._wandb is not None:
            self._mirror(lambda run: run.finish(exit_code=1 if failed else 0))
            self._wandb = None

    @property
    def wandb_active(self) -> bool:
        return self._wandb is not None

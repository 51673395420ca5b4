"""Mirror an analysis' figures, tables and key numbers to Weights & Biases, when the runs use W&B.

Lazy import; offline by default (WANDB_MODE, else the runs' logger.mode, else "offline"); any failure
warns once and the analysis goes on: files on disk are the record, W&B is a mirror.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["wandb_settings", "log_outputs"]

_warned = False


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _warned = True


def wandb_settings(configs: Sequence[Mapping], choice: str = "auto") -> dict | None:
    """W&B init settings from the runs' logger configs, or None when nothing should be logged.

    choice: "off" never logs; "offline"/"online" force that mode; "auto" logs when some run was
    configured with the wandb logger and a mode other than "disabled".
    """
    if choice == "off":
        return None
    loggers = [c.get("logger") or {} for c in configs if isinstance(c, Mapping)]
    wb = [lg for lg in loggers if isinstance(lg, Mapping) and lg.get("name") == "wandb"]
    if choice == "auto" and not wb:
        return None
    lg = wb[0] if wb else {}
    mode = choice if choice in ("offline", "online") else os.environ.get("WANDB_MODE") or lg.get("mode") or "offline"
    if mode == "disabled":
        return None
    group = None
    for c in configs:
        if isinstance(c, Mapping) and c.get("name"):
            group = str(c["name"])
            break
    return {"project": lg.get("project") or "lowrank", "entity": lg.get("entity"), "mode": mode, "group": group}


def log_outputs(
    settings: dict | None,
    *,
    analysis: str,
    out_dir: Path,
    files: Sequence[Path],
    tables: Mapping[str, object] | None = None,
    summary: Mapping[str, object] | None = None,
    config: Mapping[str, object] | None = None,
) -> bool:
    """Log PNGs as images, DataFrames as tables and `summary` numbers to one W&B run; True if it worked."""
    if settings is None:
        return False
    try:
        import wandb

        run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity"),
            mode=settings["mode"],
            group=settings.get("group"),
            job_type="analysis",
            name=f"analysis-{analysis}",
            dir=str(out_dir),
            config=dict(config or {}),
            reinit=True,
        )
        payload = {}
        for f in files:
            f = Path(f)
            if f.suffix == ".png":
                payload[f"{analysis}/{f.stem}"] = wandb.Image(str(f))
        for name, df in (tables or {}).items():
            flat = df.reset_index() if hasattr(df, "reset_index") else df
            flat.columns = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in flat.columns]
            payload[f"{analysis}/{name}"] = wandb.Table(dataframe=flat.astype(str))
        if payload:
            run.log(payload)
        for k, v in (summary or {}).items():
            if isinstance(v, (int, float, str, bool)):
                run.summary[k] = v
        run.finish()
        return True
    except Exception as e:  # noqa: BLE001 - W&B is a mirror; never fail the analysis on it
        _warn_once(f"W&B logging skipped ({type(e).__name__}: {e}); the files in {out_dir} are complete")
        return False

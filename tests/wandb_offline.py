"""Reading an offline W&B run back in the tests (no W&B server): the run file's records, parsed with W&B's own
protobuf types. wandb >= 0.19 ships no Python reader of its run files (its ``datastore`` moved into the Go
core), and ``wandb.Api`` needs a synced run, so the tests that check what the tracker logged read the file
here; the runner itself never reads W&B back."""

from __future__ import annotations

import json
from pathlib import Path

_LOG_HEADER, _LOG_BLOCK = 7, 32768  # the .wandb file is a LevelDB-style log of protobuf Records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list[bytes]:
    """The raw records of a ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks (crc32c 4 bytes, length 2, type 1, data), a record split FIRST/MIDDLE/LAST
    across blocks; block tails shorter than a chunk header are zero padding."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    records, pending, pos = [], b"", _LOG_HEADER
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + _LOG_HEADER:pos + _LOG_HEADER + length]
        pos += _LOG_HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
        else:  # zeros: the unwritten tail of a run that is still open or was killed
            break
    return records


def read_offline_run(folder) -> dict:
    """Read back an offline W&B run without W&B's servers: ``{"config": {...}, "history": [{...}, ...],
    "summary": {...}, "name": str, "group": str, "id": str}``.

    ``folder`` is a run dir (the newest ``wandb/offline-run-*`` inside is used), an ``offline-run-*``
    folder, or a ``.wandb`` file.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    if folder.is_file():
        path = folder
    else:
        files = sorted(folder.glob("run-*.wandb")) or sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no offline W&B run under {folder}; run with logger=wandb and WANDB_MODE=offline")
        path = files[-1]
    out: dict = {"config": {}, "history": [], "summary": {}, "name": None, "group": None, "id": None}

    def values(items) -> dict:
        return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}

    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, id=record.run.run_id)
            out["config"].update(values(record.run.config.update))
        elif kind == "config":
            out["config"].update(values(record.config.update))
        elif kind == "history":
            out["history"].append(values(record.history.item))
        elif kind == "summary":
            out["summary"].update(values(record.summary.update))
    return out

"""Committed reports and result JSON name no machine's paths: ``portable`` rewrites every absolute path in a
string (or, recursively, in a JSON-like object) to one relative to the repository, or else to its last part
(a temporary folder's ``llama1b``, ``model.pretrained=minilm-bf16``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: an absolute POSIX path of at least two parts, not inside a word (``ms/step``, ``α/r`` are left alone)
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:[\w.+=@-]+/)+[\w.+=@-]*")


def _relative(match: re.Match, root: Path) -> str:
    path = Path(match.group(0))
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return path.name or path.parent.name


def portable(value, root: Path = ROOT):
    """``value`` with every absolute path made relative to ``root`` (or cut to its last part)."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: _relative(m, root), value)
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    return value

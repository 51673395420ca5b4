"""Task data: local copies (``paths.data_dir``) or the hub (through ``datasets``), then tokens.

``load_raw(task, data_dir)`` gives a ``DatasetDict`` with ``train`` and ``eval`` (and ``test`` where the
local files have one); ``raw_columns`` the same as plain lists, reading local files without importing
``datasets`` (the hub alone needs it):

- classification: columns ``text`` (str) and ``label`` (int);
- generation (E2E): ``train`` has one row per (``mr``, ``ref``) pair; ``eval`` one row per distinct
  meaning representation, ``mr`` and ``refs`` (all its references, in file order).

Local formats (each folder's SOURCE.md): ``label_text`` (``<label> <text>`` lines, split on "\\n" only
because Latin-1 files contain \\x85, which ``str.splitlines`` would treat as a line break), ``cola_tsv``
(no header, ``csv.QUOTE_NONE``) and ``e2e_csv`` (header ``mr,ref,...``). Tasks with one unsplit file get
a fixed split from ``task.split.seed`` (not the run's seed: every run holds out the same examples).
If the local files are missing and the hub is reachable, the task's ``hub`` source is used instead.
Every split is checked when read, before any model loads (``check_split`` and the readers): each line
decodes, has its columns and a label in the task's set, and no split is empty; ``DataError`` (a
``ConfigError``: one line naming the file, the line and the fix) otherwise.

``load(task, tokenizer, ...)`` tokenises: ``input_ids`` + ``labels`` (class ids, or for generation the
target tokens with the prompt masked to -100), and ``collate`` pads a batch. Tokenised local data is
cached per (task, files, tokenizer, max_seq_len, max_eval_samples) under ``$LOWRANK_CACHE_DIR``
(default ``~/.cache/lowrank``): a later run reads one pickle instead of tokenising again
(``LOWRANK_CACHE_DIR=off`` turns the cache off).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lowrank.runner.config import ConfigError, cache_dir, check_data_dir, first_line, local_files

log = logging.getLogger(__name__)
IGNORE = -100  # label of positions that carry no loss (prompt tokens, padding)


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


# ---- reading local files ------------------------------------------------------------------------------
#
# A reader turns one local file into columns (``text``/``label``, or ``mr``/``ref``) plus ``line``, each
# row's line number in the file, and raises ``DataError`` for a line it cannot use (bad encoding, missing
# columns, a label that is not an integer). ``check_split`` then checks what every task of the kind needs
# (labels in the task's set, at least one example), whichever reader produced the rows. A new format (an
# image folder, say) is one more entry in ``READERS`` (and ``config.LOCAL_FORMATS``) whose rows carry
# ``line`` (or any per-row locator it names in its messages) and ``label``.

class DataError(ConfigError):
    """Task data that cannot be used as it is: one line naming the file, the line and the fix."""


def _read_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not valid {encoding}; fix: re-save the file "
                        f"as {encoding}, or set task.local.encoding to its encoding (e.g. latin-1)") from None


def _label(path: Path, n: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{n}: label {value[:40]!r} is not an integer; fix: correct or remove the line, or "
                        f"check task.local.format for this file") from None


def read_label_text(path: Path, encoding: str = "utf-8") -> dict[str, list]:
    """``<label> <text>`` per line -> {"text": [...], "label": [...], "line": [...]}. A label with no text after
    it is kept as an empty text (the published SentEval files hold a few: CR and MPQA, whose example counts
    include them) and said once per file, naming the first such line."""
    texts, labels, lines, empty = [], [], [], []
    for n, line in enumerate(_read_text(path, encoding).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        labels.append(_label(path, n, label))
        if not text.strip():
            empty.append(n)
        texts.append(text.strip())
        lines.append(n)
    if empty:
        log.warning("%s: %d line(s) hold a label but no text (first: line %d); kept as empty texts", path,
                    len(empty), empty[0])
    return {"text": texts, "label": labels, "line": lines}


def read_cola_tsv(path: Path, encoding: str = "utf-8") -> dict[str, list]:
    """CoLA's raw TSV (source, label, author's mark, sentence) -> {"text", "label", "line"}."""
    rows = csv.reader(io.StringIO(_read_text(path, encoding), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    texts, labels, lines = [], [], []
    for row in rows:
        if not row:
            continue
        n = rows.line_num
        if len(row) < 4 or not row[3].strip():
            empty = "with an empty sentence " if len(row) >= 4 else ""
            raise DataError(f"{path}:{n}: {len(row)} tab-separated column(s) {empty}where CoLA has 4 (source, label, "
                            f"mark, sentence); fix: correct or remove the line")
        labels.append(_label(path, n, row[1]))
        texts.append(row[3])
        lines.append(n)
    return {"text": texts, "label": labels, "line": lines}


def read_e2e_csv(path: Path, encoding: str = "utf-8") -> dict[str, list]:
    """E2E's CSV -> {"mr": [...], "ref": [...], "line": [...]}, one row per reference."""
    reader = csv.DictReader(io.StringIO(_read_text(path, encoding), newline=""))
    if not {"mr", "ref"} <= set(reader.fieldnames or ()):
        raise DataError(f"{path}:1: the header {reader.fieldnames} lacks mr and ref; fix: start the file with the "
                        f"E2E header mr,ref,...")
    mrs, refs, lines = [], [], []
    for row in reader:
        if not (row.get("mr") or "").strip() or not (row.get("ref") or "").strip():
            raise DataError(f"{path}:{reader.line_num}: a row without its mr or ref; fix: correct or remove the line")
        mrs.append(row["mr"])
        refs.append(row["ref"])
        lines.append(reader.line_num)
    return {"mr": mrs, "ref": refs, "line": lines}


def check_split(task, source, columns: dict[str, list]) -> None:
    """What every split of a task needs, whichever reader made it: at least one example, and (classification)
    every label in the task's label set ``0 .. num_labels-1``. ``source`` names the file (or hub split)."""
    n = len(next(iter(columns.values()), []))
    if n == 0:
        raise DataError(f"{source}: no examples, so task {task.name} would train or evaluate on nothing; fix: put "
                        f"the task's examples in the file, or point paths.data_dir at a complete copy")
    if task.kind != "classification":
        return
    allowed = range(task.num_labels)
    where = columns.get("line") or [None] * n
    for label, line in zip(columns["label"], where):
        if label not in allowed:
            at = f"{source}:{line}" if line is not None else f"{source} (row of label {label})"
            raise DataError(f"{at}: label {label} is not one of task {task.name}'s labels 0..{task.num_labels - 1}; "
                            f"fix: correct or remove the line, or set task.num_labels")


READERS = {"label_text": read_label_text, "cola_tsv": read_cola_tsv, "e2e_csv": read_e2e_csv}


def group_references(columns: dict[str, list]) -> dict[str, list]:
    """(mr, ref) rows -> one row per distinct mr with all its refs, in order of first appearance."""
    refs: dict[str, list[str]] = {}
    for mr, ref in zip(columns["mr"], columns["ref"]):
        refs.setdefault(mr, []).append(ref)
    return {"mr": list(refs), "refs": list(refs.values())}


def fixed_split(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): a seeded permutation, the first ceil(fraction·n) held out, each part
    in file order."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(np.ceil(eval_fraction * n))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def local_columns(task, data_dir) -> dict[str, dict[str, list]]:
    """The task's local files under ``data_dir`` as ``{split: {column: list}}`` (see the module docstring),
    each file checked (``check_split``); plain lists, so that reading local data never imports ``datasets``."""
    root = Path(str(data_dir)).expanduser()
    reader = READERS[task.local.format]
    splits: dict[str, dict[str, list]] = {}
    for split, rel in local_files(task).items():
        splits[split] = reader(root / rel, task.local.encoding)
        check_split(task, root / rel, splits[split])
    for columns in splits.values():
        columns.pop("line", None)
    if "all" in splits:
        columns = splits.pop("all")
        train_idx, eval_idx = fixed_split(len(next(iter(columns.values()))), task.split.eval_fraction, task.split.seed)
        splits["train"] = {k: [v[i] for i in train_idx] for k, v in columns.items()}
        splits["eval"] = {k: [v[i] for i in eval_idx] for k, v in columns.items()}
        for split in ("train", "eval"):
            check_split(task, f"{root / local_files(task)['all']} ({split} part)", splits[split])
    if task.kind == "generation":
        for split in ("eval", "test"):
            if split in splits:
                splits[split] = group_references(splits[split])
    return splits


def read_local(task, data_dir) -> "datasets.DatasetDict":
    """``local_columns`` as a DatasetDict."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_dict(columns) for split, columns in local_columns(task, data_dir).items()})


def load_hub(task, fix: str):
    """The task's hub dataset (``task.hub.path``, ``.name``; needs internet or the datasets cache); a failure is
    one line ending in ``fix``."""
    from datasets import load_dataset

    hub = task.hub
    try:
        return load_dataset(hub.path, hub.name) if hub.name else load_dataset(hub.path)
    except Exception as e:  # noqa: BLE001 - any failure becomes one line
        raise ConfigError(f"could not load task {task.name!r} from the hub ({hub.path}: {first_line(e)}); fix: "
                          f"{fix}") from None


def read_hub(task) -> "datasets.DatasetDict":
    """The task's hub source, renamed to the local columns (needs internet or the datasets cache)."""
    from datasets import DatasetDict

    hub = task.hub
    raw = load_hub(task, "set LOWRANK_DATA_DIR (or paths.data_dir=...) to a folder with the local files")
    out = {}
    for split, hub_split in (("train", hub.train), ("eval", hub.eval)):
        ds = raw[hub_split]
        if task.kind == "generation":
            columns = {"mr": ds[hub.text], "ref": ds[hub.label] if isinstance(ds[hub.label][0], str)
                       else [r[0] for r in ds[hub.label]]}
            ds = type(ds).from_dict(columns if split == "train" else group_references(columns))
        else:
            ds = ds.select_columns([hub.text, hub.label]).rename_columns({hub.text: "text", hub.label: "label"})
        out[split] = ds
    return DatasetDict(out)


def _has_local_files(task, data_dir) -> bool:
    root = Path(str(data_dir)).expanduser()
    return all((root / rel).is_file() for rel in local_files(task).values())


def load_raw(task, data_dir) -> "datasets.DatasetDict":
    """Local files if present, else the hub source (if allowed); ConfigError otherwise."""
    _quiet()
    check_data_dir(task, data_dir)  # raises when missing and the hub cannot stand in
    if _has_local_files(task, data_dir):
        return read_local(task, data_dir)
    return _from_hub(task, data_dir)


def _from_hub(task, data_dir) -> "datasets.DatasetDict":
    log.warning("task %s: no local files under %s; loading %s from the hub", task.name,
                Path(str(data_dir)).expanduser(), task.hub.path)
    return read_hub(task)


def raw_columns(task, data_dir) -> dict[str, dict[str, list]]:
    """``load_raw`` as ``{split: {column: list}}``: local files without ``datasets``, the hub through it."""
    check_data_dir(task, data_dir)
    if _has_local_files(task, data_dir):
        return local_columns(task, data_dir)
    _quiet()
    splits = {split: ds.to_dict() for split, ds in _from_hub(task, data_dir).items()}
    for split, columns in splits.items():
        check_split(task, f"{task.hub.path} ({split})", columns)
    return splits


# ---- tokenising --------------------------------------------------------------------------------------

class Columns:
    """A tokenised split as plain lists (``input_ids``, ``labels``), indexed like a ``datasets.Dataset``:
    ``split["input_ids"]`` a column, ``split[i]`` a row, ``split[[i, j]]`` a batch (a dict of lists)."""

    def __init__(self, columns: dict[str, list]):
        self.columns = {k: list(v) for k, v in columns.items()}
        self.column_names = list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        if isinstance(key, int):
            return {k: v[key] for k, v in self.columns.items()}
        return {k: [v[i] for i in key] for k, v in self.columns.items()}


@dataclass
class TaskData:
    """Tokenised train/eval sets and what evaluation needs."""
    kind: str
    train: Columns                       # input_ids, labels
    eval: Columns                        # input_ids, labels (generation: prompt+first ref, for eval loss)
    pad_id: int
    prompts: list[list[int]] = field(default_factory=list)   # generation: prompt ids per eval MR
    references: list[list[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)          # generation: the eval MRs
    decode: Callable[[list[int]], str] | None = None          # generation: token ids -> text


def _generation_example(tokenizer, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + t)[:max_len]
    labels = ([IGNORE] * len(p) + t)[:max_len]
    return ids, labels


def _cache_file(task, tokenizer, data_dir, max_seq_len: int, max_eval_samples) -> Path | None:
    """Where the tokenised data of this (task, local files, tokenizer, lengths) is cached; None when the
    cache is off or the files are not local."""
    cache = cache_dir("tokenised")
    if cache is None or not _has_local_files(task, data_dir):
        return None
    root = Path(str(data_dir)).expanduser()
    files = [root / rel for rel in local_files(task).values()]
    from omegaconf import OmegaConf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the tokenizer itself, not the truncation/padding state a call leaves in it
        state = json.loads(backend.to_str())
        vocab = json.dumps({k: v for k, v in state.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = json.dumps({"task": OmegaConf.to_container(task, resolve=True) if OmegaConf.is_config(task) else task,
                      "files": [[str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files],
                      "tokenizer": [type(tokenizer).__name__, hashlib.sha1(vocab.encode()).hexdigest(),
                                    tokenizer.pad_token_id, tokenizer.eos_token_id],
                      "max_seq_len": max_seq_len, "max_eval_samples": max_eval_samples, "format": 2},
                     sort_keys=True, default=str)
    return cache / f"{task.name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pkl"


def load(task, tokenizer, *, data_dir, max_seq_len: int, max_eval_samples: int | None = None,
         raw: dict[str, dict[str, list]] | None = None) -> TaskData:
    """Read ``task`` (``raw_columns``, or ``raw`` when already read) and tokenise it for ``tokenizer``,
    truncating at ``max_seq_len``; from the cache when this exact tokenisation was done before."""
    from lowrank.atomic import atomic_path

    if task.get("image") is not None:  # an image task: pixels, not tokens
        from lowrank.runner import images

        return images.load(task, tokenizer, data_dir=data_dir, max_eval_samples=max_eval_samples)
    cache = _cache_file(task, tokenizer, data_dir, max_seq_len, max_eval_samples)
    if cache is not None and cache.is_file():
        try:
            fields = pickle.loads(cache.read_bytes())
        except Exception:  # noqa: BLE001 - an unreadable cache entry is rebuilt
            fields = None
        if fields is not None:
            return _with_decoder(TaskData(**fields), tokenizer)
    td = _tokenise(task, tokenizer, raw if raw is not None else raw_columns(task, data_dir), max_seq_len=max_seq_len,
                   max_eval_samples=max_eval_samples)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fields = {k: getattr(td, k) for k in ("kind", "train", "eval", "pad_id", "prompts", "references", "sources")}
        with atomic_path(cache) as tmp:
            tmp.write_bytes(pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL))
    return td


def _with_decoder(td: TaskData, tokenizer) -> TaskData:
    if td.kind == "generation":
        td.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return td


def _batched(fn, columns: dict[str, list], size: int = 1000) -> dict[str, list]:
    """``fn`` over slices of ``size`` rows of ``columns`` (a dict of lists), its outputs concatenated: what
    ``datasets.Dataset.map(fn, batched=True)`` computes, without building Arrow tables."""
    n = len(next(iter(columns.values()), []))
    out: dict[str, list] = {}
    for start in range(0, n, size):
        for k, v in fn({k: v[start:start + size] for k, v in columns.items()}).items():
            out.setdefault(k, []).extend(v)
    return out


def _tokenise(task, tokenizer, raw: dict[str, dict[str, list]], *, max_seq_len: int,
              max_eval_samples: int | None) -> TaskData:
    train, ev = raw["train"], raw["eval"]
    if max_eval_samples is not None:
        ev = {k: v[:max_eval_samples] for k, v in ev.items()}
    pad_id = tokenizer.pad_token_id
    if task.kind == "classification":
        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=max_seq_len)
            return {"input_ids": enc["input_ids"], "labels": batch["label"]}
        return TaskData("classification", _columns(_batched(encode, train)), _columns(_batched(encode, ev)), pad_id)

    def encode_pairs(batch, column):  # train: one row per (mr, ref); eval: (mr, refs), loss on the first ref
        pairs = [_generation_example(tokenizer, task.prompt.format(mr=mr), ref if isinstance(ref, str) else ref[0],
                                     max_seq_len) for mr, ref in zip(batch["mr"], batch[column])]
        return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}

    prompts = [tokenizer(task.prompt.format(mr=mr))["input_ids"][-max_seq_len:] for mr in ev["mr"]]
    td = TaskData("generation",
                  _columns(_batched(lambda b: encode_pairs(b, "ref"), train)),
                  _columns(_batched(lambda b: encode_pairs(b, "refs"), ev)),
                  pad_id, prompts=prompts, references=list(ev["refs"]), sources=list(ev["mr"]))
    return _with_decoder(td, tokenizer)


def _columns(split: dict[str, list]) -> Columns:
    return Columns({k: split.get(k, []) for k in ("input_ids", "labels")})


def bucket_width(longest: int, max_len: int, buckets: int) -> int:
    """The padded width of a batch whose longest sequence is ``longest``: with ``buckets`` > 0, the
    smallest of ``buckets`` fixed widths (``max_len·k/buckets`` rounded up to a multiple of 8, k = 1..buckets)
    that holds it, so a compiled graph (and its CUDA graph) is reused for every batch of that bucket;
    with 0, ``longest`` itself."""
    if buckets <= 0 or longest > max_len:
        return longest
    for k in range(1, buckets + 1):
        width = min(max_len, -(-max_len * k // buckets // 8) * 8)
        if width >= longest:
            return width
    return max_len


def collate(examples: dict[str, list], pad_id: int, kind: str, *, width: int | None = None,
            device: torch.device | str | None = None, packed: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch (``Dataset[indices]``: a dict of lists) on the right to its longest sequence (or to
    ``width``) and move it to ``device`` (an asynchronous copy on CUDA). ``packed``: see ``pack``."""
    if packed:
        return _to(pack(examples, pad_id, width=width), device)
    ids = examples["input_ids"]
    width = max(width or 0, max(len(x) for x in ids))
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    if kind == "classification":
        labels = np.asarray(examples["labels"], dtype=np.int64)
    else:
        labels = np.full((len(ids), width), IGNORE, dtype=np.int64)
        for i, y in enumerate(examples["labels"]):
            labels[i, :len(y)] = y
    return _to({"input_ids": input_ids, "attention_mask": mask, "labels": labels}, device)


def pack(examples: dict[str, list], pad_id: int, *, width: int | None = None) -> dict[str, np.ndarray]:
    """A causal-LM batch as one row without padding between its sequences (padding-free training).

    The sequences are laid end to end and the row is padded on the right to ``width`` (at least their total).
    ``position_ids`` restart at 0 with each sequence and are 0 on the padding, so that no position exceeds the
    longest sequence's (RoPE variants that scale with the largest position see what each sequence alone gives).
    ``cu_seq_lens`` holds the sequences' boundaries, 0, l1, l1+l2, …, total, width (the padding is a last
    sequence of its own, possibly empty: the shape depends on the number of sequences alone). Each sequence's
    first token carries no label, so no token is scored from the one before it that belongs to another
    sequence. With attention kept within each sequence (``lowrank.runner.accel.packed_attention``), the loss
    is the padded batch's: the mean over the same target tokens.
    """
    ids, labels = examples["input_ids"], examples["labels"]
    lengths = [len(x) for x in ids]
    total = sum(lengths)
    width = max(width or 0, total)
    input_ids = np.full((1, width), pad_id, dtype=np.int64)
    targets = np.full((1, width), IGNORE, dtype=np.int64)
    positions = np.zeros((1, width), dtype=np.int64)
    start = 0
    for x, y in zip(ids, labels):
        n = len(x)
        input_ids[0, start:start + n] = x
        targets[0, start:start + len(y)] = y
        targets[0, start] = IGNORE
        positions[0, start:start + n] = np.arange(n)
        start += n
    cu = np.asarray([0, *np.cumsum(lengths), width], dtype=np.int32)
    return {"input_ids": input_ids, "labels": targets, "position_ids": positions, "cu_seq_lens": cu}


def _to(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return {k: torch.from_numpy(v) for k, v in batch.items()}
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad prompts on the left, as batched generation with a decoder-only model needs."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

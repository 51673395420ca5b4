"""ΔW's ``(out, in)`` layout comes from the layer's kind, never from its shape: ``as_matrix`` against each layer's
own forward, and full fine-tuning of a tiny GPT-2 (Conv1D weights stored ``(in, out)``, the square ``c_proj``
included) read back by the results API against ``W − W0`` computed by hand from the saved files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lowrank.adapters.base import KINDS, as_matrix, layer_kind, to_native

from conftest import _tokenizer_into, run_cli, tiny_args


def layers() -> dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return {"linear": nn.Linear(5, 5), "conv1d": Conv1D(5, 5), "conv2d": nn.Conv2d(3, 4, 2), "embedding": nn.Embedding(5, 5)}


@pytest.mark.parametrize("kind", KINDS)
def test_as_matrix_is_the_map_the_layer_computes(kind):
    """Reference: the layer's own forward, minus its bias, on the standard basis (or on unfolded patches for a
    convolution): column j of the (out, in) matrix is the layer's response to input feature j. Square layers,
    so that a transpose would go unnoticed by shapes."""
    layer = layers()[kind]
    assert layer_kind(layer) == kind
    matrix = as_matrix(layer.weight, kind)
    with torch.no_grad():
        if kind == "embedding":
            expected = layer(torch.arange(5)).t()                           # id j -> column j
        elif kind == "conv2d":
            x = torch.randn(1, 3, 2, 2)                                     # one patch: the conv is one matmul
            expected = None
            torch.testing.assert_close(layer(x).flatten() - layer.bias, matrix @ x.flatten())
        else:
            expected = (layer(torch.eye(5)) - layer.bias).t()               # basis vector j -> column j
    if expected is not None:
        torch.testing.assert_close(matrix, expected)
    assert torch.equal(to_native(layer, kind, matrix), layer.weight)      # and back to the stored layout


def test_an_unknown_kind_is_one_line():
    with pytest.raises(ValueError, match="layer kind 'conv3d' is unknown; choose one of linear"):
        as_matrix(torch.zeros(2, 2), "conv3d")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 (hidden 32, random weights) with MiniLM's tokenizer, as a local folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=101,
                               eos_token_id=102, pad_token_id=0)).save_pretrained(folder)
    _tokenizer_into(folder, eos="[SEP]")
    return folder


def test_full_fine_tuning_delta_of_gpt2_is_w_minus_w0_by_hand(tiny_gpt2, tiny_data, tmp_path):
    from lowrank.runner import results

    run_dir = tmp_path / "run"
    proc = run_cli("adapter=full", "targets=[q,o]", "task=e2e", *tiny_args(tiny_gpt2, f"hydra.run.dir={run_dir}"),
                   data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deltas = results.load_run(run_dir).deltas()
    w0 = load_file(str(tiny_gpt2 / "model.safetensors"))
    trained = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    modules = [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]
    assert sorted(deltas) == sorted(modules)
    for name in modules:
        # GPT-2's Conv1D computes x @ W + b with W stored (in, out): the (out, in) update is (W − W0)ᵀ
        expected = (trained[f"{name}.weight"].double() - w0[f"{name}.weight"].double()).t()
        assert deltas[name].shape == (96 if name.endswith("c_attn") else 32, 32)
        assert expected.abs().max() > 0, "training moved the weight"
        torch.testing.assert_close(deltas[name].double(), expected, atol=1e-6, rtol=0)

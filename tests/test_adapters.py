"""Adapter layers against independent float64 references of the papers' formulas.

Every layer kind (Linear with and without bias, GPT-2 Conv1D, Conv2d with dilation, groups and
reflect padding, Embedding) × every adapter: identity at init, merged == unmerged, delta_weight ==
merged − base, and the forward equal to the paper's formula evaluated in float64 from the raw tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.adapters import DoRA, FLoRA, FusedLoRA, IA3, LoRA

torch.set_default_dtype(torch.float32)


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D (weight stored (in, out)), re-declared so the test pins the layout."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.2)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def make_base(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A base layer with non-trivial weights and an input for it."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(12, 10), torch.randn(3, 5, 12)
    elif kind == "linear_nobias":
        layer, x = nn.Linear(12, 10, bias=False), torch.randn(3, 5, 12)
    elif kind == "conv1d":
        layer, x = Conv1D(10, 12), torch.randn(3, 5, 12)
    elif kind == "gpt2_conv1d":  # transformers' own class (the weight-scaled DoRA path checks its type)
        from transformers.pytorch_utils import Conv1D as HFConv1D
        layer, x = HFConv1D(10, 12), torch.randn(3, 5, 12)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), torch.randn(2, 6, 9, 9)
    elif kind == "conv2d_groups_reflect":
        layer = nn.Conv2d(6, 8, 3, padding=1, groups=2, padding_mode="reflect", bias=False)
        x = torch.randn(2, 6, 7, 7)
    elif kind == "embedding":
        layer, x = nn.Embedding(20, 10, padding_idx=0), torch.randint(0, 20, (3, 5))
    else:  # pragma: no cover
        raise KeyError(kind)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer, x


def build(adapter: str, base: nn.Module, rank: int = 3, alpha: float = 7.0, **kw):
    if adapter == "lora":
        return LoRA(base, rank, alpha, **kw)
    if adapter == "dora":
        return DoRA(base, rank, alpha, **kw)
    if adapter == "flora":
        return FLoRA(base, rank, scale=0.7, **kw)
    if adapter == "ia3":
        return IA3(base, **kw)
    raise KeyError(adapter)


def perturb(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def native_to_matrix(base: nn.Module, kind: str, w: torch.Tensor) -> torch.Tensor:
    if kind.startswith("conv2d"):
        return w.flatten(1)
    if kind in ("conv1d", "embedding"):
        return w.t()
    return w


def run_with_weight(base: nn.Module, kind: str, x: torch.Tensor, w_native: torch.Tensor, bias) -> torch.Tensor:
    """The base layer's operation with a replacement weight, in float64."""
    x64 = x if not x.is_floating_point() else x.double()
    b = None if bias is None else bias.double()
    if kind.startswith("linear"):
        return F.linear(x64, w_native.double(), b)
    if kind == "conv1d":
        return x64 @ w_native.double() + b
    if kind == "embedding":
        return F.embedding(x64, w_native.double(), base.padding_idx)
    if base.padding_mode != "zeros":
        x64 = F.pad(x64, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    else:
        padding = base.padding
    return F.conv2d(x64, w_native.double(), b, base.stride, padding, base.dilation, base.groups)


def reference_matrix(adapter: str, layer, w0: torch.Tensor) -> torch.Tensor:
    """The adapted weight matrix (out, in) from the papers' formulas, float64, from raw tensors."""
    w0 = w0.double()
    if adapter in ("lora", "dora"):
        update = (layer.alpha / layer.rank) * layer.lora_B.double() @ layer.lora_A.double()
        if adapter == "lora":
            return w0 + update
        v = w0 + update
        return layer.magnitude.double()[:, None] * v / v.norm(dim=1, keepdim=True)
    if adapter == "flora":
        G, Ai, Ao = layer.core.double(), layer.A_in.double(), layer.A_out.double()
        if G.dim() == 2:  # ΔW = s · A_out Gᵀ A_inᵀ
            return w0 + layer.scaling * Ao @ G.t() @ Ai.t()
        # Tucker: ΔW[o,c,y,x] = s Σ G[a,b,p,q] A_in[c,a] A_out[o,b] A_kh[y,p] A_kw[x,q], by successive mode products
        t = torch.tensordot(G, Ai, dims=([0], [1]))            # (b,p,q,c)
        t = torch.tensordot(t, Ao, dims=([0], [1]))            # (p,q,c,o)
        t = torch.tensordot(t, layer.A_kh.double(), dims=([0], [1]))  # (q,c,o,y)
        t = torch.tensordot(t, layer.A_kw.double(), dims=([0], [1]))  # (c,o,y,x)
        return w0 + layer.scaling * t.permute(1, 0, 2, 3).flatten(1)
    if adapter == "ia3":
        l = layer.ia3_scale.double()
        if layer.feedforward:
            reps = w0.shape[1] // l.numel()
            return w0 * l.repeat_interleave(reps)[None, :]
        return w0 * l[:, None]
    raise KeyError(adapter)


KINDS = ["linear", "linear_nobias", "conv1d", "conv2d", "conv2d_groups_reflect", "embedding"]
CASES = [(a, k) for a in ("lora", "dora", "flora", "ia3") for k in KINDS
         if not (k == "embedding" and a != "lora")]


@pytest.mark.parametrize("adapter,kind", CASES)
def test_identity_at_init(adapter, kind):
    base, x = make_base(kind)
    y0 = base(x).detach().clone()
    layer = build(adapter, base)
    assert (layer(x) - y0).abs().max().item() <= 1e-6


@pytest.mark.parametrize("adapter,kind", CASES)
def test_forward_merge_and_delta_match_float64_reference(adapter, kind):
    base, x = make_base(kind)
    w0_native = base.weight.detach().clone()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
    layer = build(adapter, base)
    perturb(layer)
    layer.eval()

    w0 = native_to_matrix(base, kind, w0_native)
    ref_matrix = reference_matrix(adapter, layer, w0)
    ref_native = ref_matrix.reshape(w0_native.shape) if kind.startswith("conv2d") else (
        ref_matrix.t() if kind in ("conv1d", "embedding") else ref_matrix)
    ref_bias = bias
    if adapter == "ia3" and not layer.feedforward and bias is not None:
        ref_bias = bias * layer.ia3_scale.detach()
    expected = run_with_weight(base, kind, x, ref_native, ref_bias)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    unmerged = layer(x).detach()
    assert rel(unmerged, expected) <= 1e-5

    delta = layer.delta_weight()
    assert delta.dtype == torch.float32 and delta.shape == (layer.out_features, layer.in_features)
    assert rel(delta, ref_matrix - w0.double()) <= 1e-5

    layer.merge()
    assert layer.merged
    merged_out = layer(x).detach()
    assert rel(merged_out, expected) <= 1e-5
    merged_matrix = native_to_matrix(base, kind, base.weight.detach())
    assert rel(merged_matrix - w0, delta.double()) <= 1e-5
    assert rel(layer.delta_weight(), delta.double()) <= 1e-5  # ΔW is the same when read while merged
    if bias is not None and adapter != "ia3":
        assert torch.equal(base.bias, bias), "the bias must never be rescaled"

    layer.unmerge()
    assert rel(base.weight.detach(), w0_native.double()) <= 1e-6
    assert rel(layer(x).detach(), expected) <= 1e-5


def test_ia3_feedforward_scales_the_input():
    base, x = make_base("linear")
    layer = IA3(base, feedforward=True)
    perturb(layer)
    expected = F.linear(x.double() * layer.ia3_scale.detach().double(), base.weight.double(), base.bias.double())
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert layer.ia3_scale.shape == (12,)


def test_dora_has_one_magnitude_per_output_row_and_starts_at_row_norms():
    base, _ = make_base("linear")
    layer = DoRA(base, 2, 4)
    assert layer.magnitude.shape == (10,)
    assert torch.allclose(layer.magnitude.double(), base.weight.double().norm(dim=1), rtol=1e-6)


def test_dora_fast_row_norm_equals_formed_sum():
    base, _ = make_base("conv1d")
    layer = DoRA(base, 3, 5)
    perturb(layer)
    v = native_to_matrix(base, "conv1d", base.weight).double() + (5 / 3) * layer.lora_B.double() @ layer.lora_A.double()
    assert torch.allclose(layer._row_norm().double(), v.norm(dim=1), rtol=1e-6)


@pytest.mark.parametrize("norm,fast", [("detached", True), ("detached", False), ("exact", True)])
def test_dora_gradients_match_float64_autograd(norm, fast):
    base, x = make_base("linear")
    layer = DoRA(base, 3, 7.0, norm=norm, fast=fast)
    perturb(layer)
    target = torch.randn(3, 5, 10)
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()

    W0, b = base.weight.detach().double(), base.bias.detach().double()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    m = layer.magnitude.detach().double().requires_grad_()
    V = W0 + (7.0 / 3) * B @ A
    n = V.norm(dim=1, keepdim=True)
    if norm == "detached":
        n = n.detach()
    y = F.linear(x.double(), m[:, None] * V / n, b)
    ((y - target.double()) ** 2).sum().backward()
    for ours, ref in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (layer.magnitude.grad, m.grad)):
        assert ((ours.double() - ref).norm() / ref.norm()).item() <= 1e-5
    # the two settings really differ (the detached gradient drops the norm's term)
    other = DoRA(make_base("linear")[0], 3, 7.0, norm="exact" if norm == "detached" else "detached")
    perturb(other)
    ((other(x) - target) ** 2).sum().backward()
    assert not torch.allclose(other.lora_A.grad, layer.lora_A.grad, rtol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "gpt2_conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_weight_scaled_path_matches_float64_formula(kind, dtype):
    """The training fast path (scale folded into W0's and B's rows, lowrank.adapters.dora._ScaledLinear)
    against the paper's formula in float64: output and the gradients of x, A, B and m."""
    base, x = make_base(kind)
    base.to(dtype)
    layer = DoRA(base, 3, 7.0)
    perturb(layer)
    x = x.to(dtype).requires_grad_()
    assert layer._weight_scaling_applies(x)
    target = torch.randn(3, 5, 10)
    y = layer(x)
    ((y.float() - target) ** 2).sum().backward()

    W0 = layer.base_matrix().detach().double()
    b = None if base.bias is None else base.bias.detach().double()
    A, B, m = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    xr = x.detach().double().requires_grad_()
    V = W0 + (7.0 / 3) * B @ A
    ref = F.linear(xr, m[:, None] * V / V.norm(dim=1, keepdim=True).detach(), b)
    ((ref - target.double()) ** 2).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() <= tol
    for ours, want in ((x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                       (layer.magnitude.grad, m.grad)):
        assert ((ours.double() - want).norm() / want.norm()).item() <= tol
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == dtype


def _with_dropout(cls):
    """A perturbed layer with input dropout 0.5 in training mode, its output, and the same dropped input."""
    base, x = make_base("linear")
    layer = cls(base, 3, 7.0, dropout=0.5)
    perturb(layer)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    return layer, base, x, y, F.dropout(x, 0.5, training=True)


def test_dora_with_dropout_follows_peft_form():
    layer, base, x, y, xd = _with_dropout(DoRA)
    W0, b = base.weight.double(), base.bias.double()
    V = W0 + (7 / 3) * layer.lora_B.double() @ layer.lora_A.double()
    scale = layer.magnitude.double() / V.norm(dim=1)
    ref = F.linear(x.double(), W0, b) + (scale - 1) * F.linear(xd.double(), W0) + scale * (
        F.linear(xd.double(), (7 / 3) * layer.lora_B.double() @ layer.lora_A.double()))
    assert torch.allclose(y.double(), ref, atol=1e-5)


def test_lora_dropout_acts_on_the_update_path_only():
    layer, base, x, y, xd = _with_dropout(LoRA)
    BA = layer.lora_B.double() @ layer.lora_A.double()
    ref = F.linear(x.double(), base.weight.double(), base.bias.double()) + (7 / 3) * F.linear(xd.double(), BA)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    layer.eval()  # no dropout at evaluation: the merged weight reproduces the output
    assert torch.allclose(layer(x).double(), F.linear(x.double(), base.weight.double() + (7 / 3) * BA,
                                                      base.bias.double()), atol=1e-5)


def test_rslora_scaling():
    base, _ = make_base("linear")
    assert LoRA(base, 4, 8, rslora=True).scaling == pytest.approx(8 / math.sqrt(4))
    assert LoRA(make_base("linear")[0], 4, 8).scaling == pytest.approx(2.0)


def test_lora_init_is_loralib():
    base, _ = make_base("linear")
    layer = LoRA(base, 4, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform_(a=√5) on (r, in): bound = sqrt(6 / ((1 + 5) · in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound


def test_flora_core_starts_at_zero_and_factors_are_kaiming():
    layer = FLoRA(make_base("conv2d")[0], 4)
    assert torch.count_nonzero(layer.core) == 0 and layer.core.shape == (4, 4, 2, 2)
    assert layer.A_kh.shape == (3, 2) and layer.A_in.shape == (6, 4) and layer.A_out.shape == (8, 4)
    assert layer.scaling == 4.0
    assert FLoRA(make_base("linear")[0], 4).scaling == pytest.approx(1.0)            # α = r
    assert FLoRA(make_base("linear")[0], 4, alpha=8).scaling == pytest.approx(2.0)   # α / r, as LoRA
    assert FLoRA(make_base("linear")[0], 4, alpha=8, scale=0.04).scaling == pytest.approx(0.04)


def test_fused_gpt2_qv_leaves_k_slice_exactly_zero():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=24, n_layer=2, n_head=4, vocab_size=50,
                                                                   bos_token_id=0, eos_token_id=0)).eval()
    x = torch.randint(0, 50, (2, 6))
    y0 = model(x).logits.detach()
    lowrank.adapt(model, "lora", targets=["q", "v"], rank=2, alpha=5)
    layers = lowrank.adapted_modules(model)
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert torch.allclose(model(x).logits, y0, atol=1e-6)
    for layer in layers.values():
        assert isinstance(layer, FusedLoRA)
        perturb(layer)
    y1 = model(x).logits.detach()
    for layer in layers.values():
        d = layer.delta_weight()
        assert d.shape == (72, 24)
        assert torch.count_nonzero(d[24:48]) == 0                # k slice untouched
        q = (5 / 2) * layer.slices["q"].lora_B.double() @ layer.slices["q"].lora_A.double()
        assert torch.allclose(d[:24].double(), q, atol=1e-6)
    lowrank.merge_adapters(model)
    assert ((model(x).logits - y1).norm() / y1.norm()).item() <= 1e-5

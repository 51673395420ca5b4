"""Module names → (layer index, attention matrix kind), for every architecture family lowrank adapts.

Pure string handling; no model or run is loaded here.

    bert.encoder.layer.3.attention.self.query      → (3, "q")
    model.layers.3.self_attn.v_proj                → (3, "v")
    transformer.h.3.attn.c_attn[q]                 → (3, "q")   (slices of a fused qkv projection)
    blocks.3.1.conv_dw                             → (3, "conv") (a ConvNet's convolution; 3 = its stage)
"""

from __future__ import annotations

import re

from lowrank.targeting import LAYER_INDEX

__all__ = ["parse_module_name", "matrix_label", "KINDS", "CONV_LAYOUT", "conv_note"]

KINDS = ("q", "k", "v", "o")
#: How a convolution's ΔW enters the matrix analyses (lowrank.adapters.base: ``weight.flatten(1)``).
CONV_LAYOUT = ("convolution updates are analysed as (out, in/groups·kh·kw) matrices (the kernel reshaped "
               "output-channel-major, as PEFT and loralib reshape it)")

# last path component (or a [slice] suffix) → kind; checked in order
_KIND_PATTERNS = [
    (re.compile(r"\[(q|k|v)\]$"), None),  # fused-qkv slice marker, kind taken from the group
    (re.compile(r"(?:^|[._])(q_proj|query|q|wq|q_lin)$"), "q"),
    (re.compile(r"(?:^|[._])(k_proj|key|k|wk|k_lin)$"), "k"),
    (re.compile(r"(?:^|[._])(v_proj|value|v|wv|v_lin)$"), "v"),
    (re.compile(r"(?:^|[._])(o_proj|out_proj|dense|wo|o|out_lin|c_proj|dense_proj)$"), "o"),
    (re.compile(r"(?:^|\.)conv[a-z_]*$"), "conv"),  # timm-style ConvNets: conv_stem, conv_dw, conv_pw, ...
]
_ANY_INDEX = re.compile(r"\.(\d+)\.")


def parse_module_name(name: str) -> tuple[int | None, str | None]:
    """(layer index, kind) for a qualified module name; None where it cannot be read off the name.

    The output projection is recognised only inside an attention block (BERT's `attention.output.dense`,
    not the MLP's `output.dense`).
    """
    layer = None
    m = LAYER_INDEX.search(name)  # the same layer pattern targeting uses (layers.N, layer.N, h.N, ...)
    if m is None:
        m = _ANY_INDEX.search("." + name + ".")
    if m is not None:
        layer = int(m.group(1))
    kind = None
    for pat, k in _KIND_PATTERNS:
        hit = pat.search(name)
        if hit is None:
            continue
        kind = k if k is not None else hit.group(1)
        break
    if kind == "o" and "attn" not in name and "attention" not in name:
        kind = None
    return layer, kind


def matrix_label(kind: str | None) -> str:
    """'q' → 'Wq' (the papers' names)."""
    return f"W{kind}" if kind else "W"


def conv_note(modules) -> str | None:
    """``CONV_LAYOUT`` when any of ``modules`` (qualified names) is a convolution, else None."""
    return CONV_LAYOUT if any(parse_module_name(m)[1] == "conv" for m in modules) else None

"""Prefix-Tuning (Li & Liang 2021, arXiv 2101.00190) and P-Tuning v2 (Liu et al. 2021, arXiv 2110.07602).

At every adapted layer i the attention attends to P trainable key and value vectors before the
sequence's own: softmax(q [P_k^i; K]^T / √d) [P_v^i; V] (Li & Liang §4, "prefix activations at every
layer"). Prefix-Tuning trains them through a reparameterisation P = MLP(P') (§4.3: P' is P×d_model, the
MLP is Linear(d_model, hidden) – tanh – Linear(hidden, layers·2·d_kv), as the authors' code
XiangLi1999/PrefixTuning ``control_trans``), which ``fold()`` evaluates once and replaces by the plain
values after training (exact: same function, the MLP's parameters dropped). P-Tuning v2 is the same
injection without the MLP (``reparam=False``; the prefix initialised N(0, 1), as PEFT's PrefixEncoder).

The prefixes are not fed as ``past_key_values`` (PEFT's route, which transformers 5 encoders refuse):
the model's attention call is routed through ``prefix_attention`` — registered with transformers'
``AttentionInterface`` under ``lowrank_prefix`` with the SDPA kernel and SDPA's masks — which prepends
the layer's prefix to the keys and values (after rotary embeddings, as cached keys would be) and
extends the attention mask so that every query (causal or not, padded or not) sees the whole prefix.
Grouped-query attention gets one prefix per key/value head. Positions of the real tokens are not
shifted by P (they would be under ``past_key_values``); prefixes carry no position.

``PrefixEncoder.remove`` gives the model back its own attention: the attention modules' prefix slots go,
every config's ``_attn_implementation`` gets its earlier value, and the ``lowrank_prefix`` registration is
dropped once no model in the process carries prefixes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.injected import Injected, attach, attention_modules

ATTENTION = "lowrank_prefix"
_SLOT = "_lowrank_prefix_slot"
#: Encoders installed on a model: ``ATTENTION`` stays registered with transformers while any of them lives.
_LIVE: weakref.WeakSet = weakref.WeakSet()


class PrefixEncoder(Injected):
    """The prefixes of ``layers`` attention layers: ``values(i)`` → (key, value), each (heads, P, head_dim)."""

    adapter_name = "prefix"
    adds = "key/value prefixes"

    def __init__(self, layers: int, length: int, kv_heads: int, head_dim: int, d_model: int, *,
                 reparam: bool = True, hidden: int = 512, device=None):
        super().__init__()
        self.restore = []  # [(a config, its _attn_implementation before install)], for ``remove``
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"length={length!r} is not a positive integer; pass e.g. length=20 prefix vectors")
        self.layers, self.length, self.kv_heads, self.head_dim = layers, length, kv_heads, head_dim
        self.width = layers * 2 * kv_heads * head_dim
        self.folded = not reparam
        if reparam:
            self.embedding = nn.Parameter(torch.randn(length, d_model, device=device))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden, device=device), nn.Tanh(),
                                     nn.Linear(hidden, self.width, device=device))
        else:
            self.prefix = nn.Parameter(torch.randn(length, self.width, device=device))

    def _rows(self, i: int) -> slice:
        per = 2 * self.kv_heads * self.head_dim
        return slice(i * per, (i + 1) * per)

    def values(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(i)
        if self.folded:
            flat = self.prefix[:, rows]
        else:  # only layer i's rows of the MLP's output layer: the same numbers as slicing the full output
            out = self.mlp[2]
            flat = F.linear(self.mlp[1](self.mlp[0](self.embedding)), out.weight[rows], out.bias[rows])
        kv = flat.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    @torch.no_grad()
    def fold(self) -> dict:
        if not self.folded:
            full = self.mlp(self.embedding)
            del self.mlp, self.embedding
            self.prefix = nn.Parameter(full)
            self.folded = True
        return {"reparam": False}

    def install(self, model: nn.Module, attention: list[nn.Module]) -> None:
        """Route ``attention``'s calls through ``prefix_attention`` with this encoder's prefixes."""
        configs = _configs(model.config)
        self.restore = [(config, config._attn_implementation) for config in configs]
        for slot, module in enumerate(attention):
            module.__dict__[_SLOT] = (self, slot)  # a plain reference: the parameters live on the model once
        _register()
        _LIVE.add(self)
        for config in configs:  # composite configs share the setting
            config._attn_implementation = ATTENTION

    def remove(self, model: nn.Module) -> None:
        for module in model.modules():
            if module.__dict__.get(_SLOT, (None,))[0] is self:
                del module.__dict__[_SLOT]
        for config, value in self.restore:  # parents first: a config's setter also sets its sub-configs
            config._attn_implementation = value
        self.restore = []
        _LIVE.discard(self)
        if not _LIVE:
            _unregister()

    def __setstate__(self, state) -> None:  # a copy of an adapted model (deepcopy, pickle) needs the registration
        super().__setstate__(state)
        if self.restore:
            _register()
            _LIVE.add(self)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, length={self.length}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, " \
               f"reparam={not self.folded}"


def _extend_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 length: int) -> torch.Tensor | None:
    """The attention mask over [prefix; keys]: every query sees the prefix; the rest as before."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if not (getattr(module, "is_causal", False) and q_len > 1):
            return None  # no padding, bidirectional (or one decoding query): everything is visible
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
    pad = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        *mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask[..., -kv_len:]], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with the module's prefix keys and values in front."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    slot = module.__dict__.get(_SLOT)
    if slot is not None:
        encoder, i = slot
        pk, pv = encoder.values(i)
        batch = query.shape[0]
        attention_mask = _extend_mask(attention_mask, module, query, key, encoder.length)
        key = torch.cat([pk.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        kwargs.pop("is_causal", None)  # the extended mask says it
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _unregister() -> None:
    """Drop ``ATTENTION`` from transformers' process-wide registries (``GeneralInterface`` has no public
    unregister; its class-level mapping is where ``register`` puts it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for interface in (AttentionInterface, AttentionMaskInterface):
        getattr(interface, "_global_mapping", {}).pop(ATTENTION, None)


def _configs(config) -> list:
    """``config`` and its sub-configs (``sub_configs``, and ``text_config``/``encoder``/``decoder``), parents
    first, each once."""
    found, todo = [], [config]
    while todo:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        for name in (*getattr(current, "sub_configs", {}), "text_config", "encoder", "decoder"):
            sub = getattr(current, name, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                todo.append(sub)
    return found


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """``(d_model, key/value heads, head_dim)`` from the model's config."""
    config = model.config
    d_model, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d_model // heads
    return d_model, kv_heads, head_dim


def inject(model: nn.Module, *, targets, layers, rank, options: dict, reparam_default: bool) -> PrefixEncoder:
    if getattr(model, "config", None) is None:
        raise ValueError(f"prefix tuning needs a transformers model (a .config); {type(model).__name__} has none")
    found = attention_modules(model, layers)
    d_model, kv_heads, head_dim = _shape(model)
    device = next(model.parameters()).device
    encoder = PrefixEncoder(len(found), options.get("length", 20), kv_heads, head_dim, d_model,
                            reparam=options.get("reparam", reparam_default), hidden=options.get("hidden", 512),
                            device=device)
    attach(model, encoder)  # first: whatever install changes, removing the encoder gives back
    encoder.install(model, [attention for _, attention in found])
    return encoder


def inject_prefix(model, targets=None, layers=None, rank=None, options=None):
    return inject(model, targets=targets, layers=layers, rank=rank, options=options or {}, reparam_default=True)


def inject_ptuning2(model, targets=None, layers=None, rank=None, options=None):
    return inject(model, targets=targets, layers=layers, rank=rank, options=options or {}, reparam_default=False)

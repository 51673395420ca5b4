"""Soft prompts: Prompt Tuning (Lester et al. 2021, arXiv 2104.08691) and P-Tuning (Liu et al. 2021,
arXiv 2103.10385).

n trainable vectors are inserted into the input embeddings and the model runs on [prompt; input] with the
attention mask extended by n ones. Where the model reads a classification token at position 0 (BERT-family
encoders: the pooler reads [CLS]), the prompt goes right after it, so the head still reads [CLS]; elsewhere
it goes first (Lester §2). A causal LM's logits are cut back to the input's positions, so losses and labels
line up with the input.

- ``prompt`` (Lester §2.2, §3.2): the n×d prompt itself trains; initialised ``random`` (uniform in
  [-0.5, 0.5], Lester §3.2), ``vocab`` (embeddings of tokens drawn from the 5000 most frequent ids, taken as
  the lowest ids as Lester's sentencepiece order; pass ``init_ids`` for another pool) or ``text`` (the
  embeddings of ``init_ids``, a tokenised text, repeated to n).
- ``ptuning`` (Liu et al. §3, "prompt encoder"): the prompt is produced by an encoder from n trainable
  input embeddings: ``lstm`` = a 2-layer bidirectional LSTM then Linear-ReLU-Linear (the paper's choice),
  or ``mlp`` = Linear-ReLU-Linear-ReLU-Linear (PEFT's PromptEncoder, hidden ``hidden``). ``fold()``
  replaces the encoder by its output (exact).

The hooks work on the model's forward with ``input_ids`` (training and evaluation); ``generate`` with a
cache is refused (the prompt would have to enter the cache once).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.adapters.injected import Injected, attach

INITS = ("random", "vocab", "text")
ENCODERS = ("lstm", "mlp")
VOCAB_POOL = 5000  # Lester §3.2: "sampled from the 5,000 most common tokens"


class SoftPrompt(Injected):
    """The n×d prompt, directly (``prompt``) or through an encoder (``ptuning``), and where it goes."""

    adapter_name = "prompt"

    def __init__(self, length: int, d_model: int, *, insert_at: int, init: torch.Tensor, encoder: str | None = None,
                 hidden: int | None = None):
        super().__init__()
        self.length, self.insert_at, self.encoder_kind = length, insert_at, encoder
        self.handles = []  # the model's forward hooks that insert the prompt (``remove`` takes them off)
        self.folded = encoder is None
        if encoder is None:
            self.prompt = nn.Parameter(init.clone())
            return
        hidden = hidden or d_model
        device = init.device
        self.inputs = nn.Parameter(init.clone())
        if encoder == "lstm":
            self.lstm = nn.LSTM(d_model, hidden, num_layers=2, bidirectional=True, batch_first=True, device=device)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(),
                                     nn.Linear(2 * hidden, d_model, device=device))
        else:
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden, device=device), nn.ReLU(),
                                     nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                     nn.Linear(hidden, d_model, device=device))

    def embeddings(self) -> torch.Tensor:
        """The n×d prompt the model sees."""
        if self.folded:
            return self.prompt
        h = self.inputs
        if self.encoder_kind == "lstm":
            h = self.lstm(h[None])[0][0]
        return self.mlp(h)

    @torch.no_grad()
    def fold(self) -> dict:
        if not self.folded:
            values = self.embeddings()
            for name in ("inputs", "lstm", "mlp"):
                if hasattr(self, name):
                    delattr(self, name)
            self.prompt = nn.Parameter(values)
            self.folded = True
        return {"encoder": None}

    def remove(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def extra_repr(self) -> str:
        return f"length={self.length}, insert_at={self.insert_at}, encoder={self.encoder_kind}"


def _cls_first(model: nn.Module) -> bool:
    """True for encoders whose head reads position 0 (BERT family: pooler / [CLS])."""
    config = model.config
    return not getattr(config, "is_decoder", False) and config.model_type in (
        "bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "ernie", "xmod", "deberta", "deberta-v2",
        "distilbert")


def _initial(embedding: nn.Embedding, length: int, options: dict) -> torch.Tensor:
    init = options.get("init", "vocab")
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown; choose one of {', '.join(INITS)}")
    weight = embedding.weight
    if init == "random":
        return torch.empty(length, weight.shape[1], device=weight.device).uniform_(-0.5, 0.5)
    ids = options.get("init_ids")
    if init == "text" and not ids:
        raise ValueError("init=text needs init_ids (the token ids of the text); pass e.g. init_ids=[101, 2023]")
    if init == "vocab":
        pool = torch.as_tensor(ids) if ids else torch.arange(min(VOCAB_POOL, weight.shape[0]))
        ids = pool[torch.randint(len(pool), (length,))]
    else:
        ids = torch.as_tensor(ids).repeat(-(-length // len(ids)))[:length]
    return weight.detach()[ids.to(weight.device)].float().clone()


def _pre_hook(module, args, kwargs):
    prompt: SoftPrompt = module.lowrank_injected
    ids = kwargs.pop("input_ids", None)
    if ids is None and args:
        ids, args = args[0], args[1:]
    cache = kwargs.get("past_key_values")
    if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
        raise ValueError("soft prompts with a key/value cache (generate) are not supported; evaluate by a forward pass")
    if ids is None:
        raise ValueError("soft prompts need input_ids; call the model with input_ids, not inputs_embeds")
    embeds = module.get_input_embeddings()(ids)
    p = prompt.embeddings().to(embeds.dtype)[None].expand(ids.shape[0], -1, -1)
    at = prompt.insert_at
    kwargs["inputs_embeds"] = torch.cat([embeds[:, :at], p, embeds[:, at:]], dim=1)
    for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
        value = kwargs.get(key)
        if value is not None:
            pad = torch.full((value.shape[0], prompt.length), fill, dtype=value.dtype, device=value.device)
            kwargs[key] = torch.cat([value[:, :at], pad, value[:, at:]], dim=1)
    if kwargs.get("position_ids") is not None:
        raise ValueError("soft prompts shift positions; call the model without position_ids")
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    logits = getattr(output, "logits", None)
    if logits is not None and logits.dim() == 3:  # token-level outputs: drop the prompt's positions
        at, n = module.lowrank_injected.insert_at, module.lowrank_injected.length
        output.logits = torch.cat([logits[:, :at], logits[:, at + n:]], dim=1)
    return output


def inject(model: nn.Module, *, options: dict, encoder_default: str | None) -> SoftPrompt:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no input embedding table (get_input_embeddings); soft prompts "
                         f"need a token-embedding model")
    if getattr(model.config, "model_type", None) is not None and type(model).__name__.endswith(
            "ForSequenceClassification") and not _cls_first(model):
        raise ValueError(f"soft prompts on {type(model).__name__} would move the last token its score head pools; "
                         f"use a BERT-family classifier or a causal LM")
    length = options.get("length", 20)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length={length!r} is not a positive integer; pass e.g. length=20 prompt tokens")
    encoder = options.get("encoder", encoder_default)
    if encoder is not None and encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r} is unknown; choose one of {', '.join(ENCODERS)}")
    prompt = SoftPrompt(length, embedding.weight.shape[1], insert_at=1 if _cls_first(model) else 0,
                        init=_initial(embedding, length, options), encoder=encoder, hidden=options.get("hidden"))
    attach(model, prompt)
    prompt.handles.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    prompt.handles.append(model.register_forward_hook(_post_hook, with_kwargs=True))
    return prompt


def inject_prompt(model, targets=None, layers=None, rank=None, options=None):
    return inject(model, options=options or {}, encoder_default=None)


def inject_ptuning(model, targets=None, layers=None, rank=None, options=None):
    return inject(model, options=options or {}, encoder_default="lstm")

"""Which transformer blocks train: the top k (``top``) or more and more of them (``gradual``).

- ``top``: fine-tune only the top ``k`` blocks (every parameter in them) and the task head, the bottom
  frozen — the LoRA paper's FT^Top2 row (arXiv 2106.09685, Table 2, k = 2, after Li & Liang 2021).
- ``gradual``: gradual unfreezing (Howard & Ruder 2018, arXiv 1801.06146, §3.2): training starts with the
  head only and one more block, from the top down, is unfrozen every ``every`` optimizer steps until
  all are (or until ``k`` are, when ``k`` is given). The schedule is a pure function of the step, so a
  resumed run applies the same one: the trainer calls ``model.lowrank_injected.on_step(step)`` before
  each optimizer step. Every block that will ever train counts as trainable (the optimizer holds them
  from the start); a block not yet unfrozen gets no gradient, so AdamW leaves it and its state alone.

Modules outside the blocks (embeddings, a pooler, a final norm) stay frozen.
"""

from __future__ import annotations

from torch import nn

from lowrank.adapters.injected import Injected, attach, block_list


def _check_k(k, blocks: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= blocks:
        raise ValueError(f"k={k!r} blocks: the model has {blocks}; pass 1 <= k <= {blocks}")
    return k


class BlockSchedule(Injected):
    """Holds no parameters; unfreezes blocks ``order[:n]`` where ``n`` depends on the step."""

    adapter_name = "layers"
    mergeable = True  # the trained blocks are the model's own weights

    def __init__(self, blocks: list[nn.Module], every: int):
        super().__init__()
        self.__dict__["_blocks"] = blocks  # the model owns them; a plain reference
        self.every = every

    def unfrozen(self, step: int) -> int:
        """Blocks (from the top) that train at optimizer step ``step`` (1-based)."""
        return min(len(self._blocks), (step - 1) // self.every) if self.every else len(self._blocks)

    def on_step(self, step: int) -> None:
        n = self.unfrozen(step)
        for i, block in enumerate(self._blocks):
            for p in block.parameters():
                p.requires_grad_(i < n)

    def extra_repr(self) -> str:
        return f"blocks={len(self._blocks)}, every={self.every}"


def _top_blocks(model: nn.Module, k) -> list[nn.Module]:
    """The top ``k`` blocks (top first), set to train."""
    name, count = block_list(model)
    k = _check_k(count if k is None else k, count)
    stack = model.get_submodule(name)
    blocks = [stack[i] for i in range(count - 1, count - 1 - k, -1)]
    for block in blocks:
        for p in block.parameters():
            p.requires_grad_(True)
    return blocks


def inject_top(model, targets=None, layers=None, rank=None, options=None):
    _top_blocks(model, (options or {}).get("k", 2))
    return None


def inject_gradual(model, targets=None, layers=None, rank=None, options=None):
    options = options or {}
    every = options.get("every", 40)
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(f"every={every!r} is not a positive number of steps; pass e.g. every=40")
    blocks = _top_blocks(model, options.get("k"))
    return attach(model, BlockSchedule(blocks, every))

"""What an adapter adds to the training loop, behind one small interface (``lowrank.training_hooks``).

Most methods add nothing. AdaLoRA (``lowrank.adapters.adalora``) adds a regulariser to the loss, an
importance update and a masking after every optimizer step, and state that a checkpoint must keep. A loop
uses the hooks in four places:

    hooks = lowrank.training_hooks(model, total_steps=T)
    loss = task_loss + hooks.penalty()          # before backward
    optimizer.step(); hooks.after_step(step)    # before the gradients are zeroed (step = 1, 2, ..., T)
    hooks.state_dict() / hooks.load_state_dict(tensors)   # beside the trainable tensors of a checkpoint
"""

from __future__ import annotations

import torch
from torch import nn


class NoHooks:
    """The hooks of a method that adds nothing to the loop."""

    def penalty(self) -> float:
        return 0.0

    def after_step(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"the checkpoint holds adapter training state ({next(iter(tensors))!r}) that this model "
                             f"has no use for; it belongs to another configuration: delete it or use another run dir")


def training_hooks(model: nn.Module, total_steps: int | None = None):
    """The training hooks of ``model``'s adapter (its registry entry's ``hooks``), or ``NoHooks``.
    ``total_steps``: the length of training, for schedules that depend on it (AdaLoRA's budget)."""
    from lowrank.adapters import spec
    from lowrank.core import CONFIG_ATTR

    config = getattr(model, CONFIG_ATTR, None)
    make = spec(config["adapter"]).hooks if config is not None else None
    if make is None:
        return NoHooks()
    return make(model, config["options"], total_steps, config)

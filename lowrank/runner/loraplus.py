"""LoRA+ (Hayou, Ghosh & Yu, 2024, arXiv 2402.12354): B's learning rate is λ times A's.

§3 of the paper shows that with one learning rate for A and B, feature learning is inefficient in wide
networks, and sets η_B = λ·η_A with λ ≫ 1 (its experiments use λ = 2^4 for most tasks). Here η_A is the
trainer's ``lr`` and every ``lora_B`` factor (LoRA, DoRA, fused slices) gets λ·lr; every other trainable
tensor (A, DoRA's magnitude, a task head) keeps ``lr``, as PEFT's ``create_loraplus_optimizer`` does. The
groups keep their weight decay, and the schedule scales each group's own rate.
"""

from __future__ import annotations


def lora_plus_groups(groups: list[dict], names: dict[int, str], lr: float, ratio: float | None) -> list[dict]:
    """``groups`` (AdamW parameter groups) with each split into its ``lora_B`` tensors at ``ratio·lr`` and the
    rest; ``names``: parameter id → qualified name. ``ratio=None``: the groups unchanged."""
    if ratio is None:
        return groups
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ValueError(f"trainer.lora_plus_ratio={ratio!r} is not a positive number; pass e.g. 16 (LoRA+ §3)")
    out = []
    for group in groups:
        is_b = [names[id(p)].endswith("lora_B") for p in group["params"]]
        out.append({**group, "params": [p for p, b in zip(group["params"], is_b) if not b]})
        out.append({**group, "params": [p for p, b in zip(group["params"], is_b) if b], "lr": ratio * lr})
    if not any(g["params"] for g in out[1::2]):
        raise ValueError(f"trainer.lora_plus_ratio={ratio} needs lora_B factors to train (adapter=lora or dora); "
                         f"fix: remove it")
    return [g for g in out if g["params"]]

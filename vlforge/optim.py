"""Which parameters train, and at what lr: locked towers, per-part lr multipliers, layer-wise decay.

Recipe keys (``[optim]``, docs/weights.md#fine-tuning):

* ``lock.<part> = { unlocked_blocks = N }``: freeze a model part (``vision``, ``text``, ...)
  except its last N blocks and what follows them (final norm, projection); N = 0 freezes the
  whole part. open_clip's ``--lock-image --lock-image-unlocked-groups N+1``.
* ``lr_multipliers = { "<name prefix>" = m }``: parameters whose name starts with the prefix
  (a part, ``vision``, or deeper, ``text.model.embeddings``) train at m × lr; the longest
  matching prefix wins.
* ``layer_decay = { <part> = d }``: layer-wise lr decay (BEiT, ELECTRA): block i of L gets
  d^(L − i) × lr (i = 1..L), the embeddings before the first block d^(L + 1) × lr, what follows
  the last block 1 × lr. Multiplies with ``lr_multipliers``.

A part's blocks are its ``shard_units()`` (``vlforge.components.ShardUnitsLike``: a ViT's blocks,
a BERT's layers, in forward order); parameters registered before the first block are its
embeddings, those after the last its head. Names that match nothing are refused at build time
(also by ``--dry-run``), listing the model's parts.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlforge.errors import UserError
from vlforge.recipe import OptimSection


def block_positions(part: nn.Module, key: str) -> tuple[dict[str, int], int]:
    """({parameter name within ``part``: layer id}, L): 0 embeddings, 1..L blocks, L + 1 the rest."""
    units = getattr(part, "shard_units", None)
    if units is None:
        raise UserError(f"{key}: this part names no blocks (it has no shard_units(); see ShardUnitsLike)")
    blocks = units()
    owner = {id(p): index + 1 for index, block in enumerate(blocks) for p in block.parameters()}
    layers, seen_block = {}, False
    for name, param in part.named_parameters():
        if id(param) in owner:
            layers[name], seen_block = owner[id(param)], True
        else:
            layers[name] = len(blocks) + 1 if seen_block else 0
    return layers, len(blocks)


def _parts(model: nn.Module) -> str:
    return ", ".join(n for n, m in model.named_children() if any(True for _ in m.parameters()))


def _part(model: nn.Module, name: str, key: str) -> nn.Module:
    part = getattr(model, name, None) if "." not in name else None
    if not isinstance(part, nn.Module):
        raise UserError(f"{key}: model has no part '{name}' (parts: {_parts(model)})")
    return part


def apply_locks(model: nn.Module, optim: OptimSection) -> None:
    """Freeze the parts ``optim.lock`` names (before DDP and the optimizer see the model)."""
    for name, lock in optim.lock.items():
        key = f"optim.lock.{name}"
        part = _part(model, name, key)
        layers, count = block_positions(part, key)
        if lock.unlocked_blocks > count:
            raise UserError(
                f"{key}.unlocked_blocks = {lock.unlocked_blocks}, but the part has {count} blocks"
            )
        first_trained = count + 1 - lock.unlocked_blocks if lock.unlocked_blocks else count + 2
        for param_name, param in part.named_parameters():
            if layers[param_name] < first_trained:
                param.requires_grad_(False)


def lr_scales(model: nn.Module, optim: OptimSection) -> dict[str, float]:
    """Parameter name -> multiplier of the lr (1.0 where no key applies)."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in optim.lr_multipliers:
        if not any(name == prefix or name.startswith(f"{prefix}.") for name in names):
            message = f"'{prefix}' is the start of no parameter name (parts: {_parts(model)})"
            raise UserError(f"optim.lr_multipliers: {message}")
    scales = {}
    for name in names:
        matches = [p for p in optim.lr_multipliers if name == p or name.startswith(f"{p}.")]
        scales[name] = optim.lr_multipliers[max(matches, key=len)] if matches else 1.0
    for part_name, decay in optim.layer_decay.items():
        key = f"optim.layer_decay.{part_name}"
        layers, count = block_positions(_part(model, part_name, key), key)
        for param_name, layer in layers.items():
            scales[f"{part_name}.{param_name}"] *= decay ** (count + 1 - layer)
    return scales


def parameter_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay, lr scale); frozen and EMA copies excluded.

    The first two groups are the decay / no-decay parameters at the base lr (what the loop logs
    as ``train/lr``); each other lr scale adds its own pair. A group's ``lr_scale`` is applied
    by the caller (``lr = base lr × lr_scale``).
    """
    scales = lr_scales(model, optim)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(pattern in name for pattern in optim.no_decay)
        groups.setdefault((scales[name], not skip), []).append(param)
    return [
        {"params": params, "weight_decay": optim.weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), params in groups.items()
        if params or scale == 1.0
    ]

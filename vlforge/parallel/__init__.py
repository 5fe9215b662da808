"""How ranks hold the model: ``apply`` wraps a built ``VLModel`` for ``train.parallel``.

* ``ddp`` (default): every rank holds the whole model, gradients are all-reduced
  (``vlforge.parallel.ddp``, options in ``[train.ddp]``).
* ``fsdp``: FSDP2 ``fully_shard`` over each part's ``shard_units()`` and then the
  root, so parameters, gradients and optimizer state are sharded
  (``vlforge.parallel.fsdp``).

Both cast frozen parameters to bf16 first when ``train.frozen_dtype = "bf16"``,
and ``train.compile`` compiles each shard unit (``vlforge.parallel.compile``).
``apply`` returns what the step calls; the ``VLModel`` stays the module the
optimizer, checkpoints and evaluators see (FSDP changes it in place).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlforge.model import VLModel
    from vlforge.recipe import Recipe


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Every shard unit any sub-module names (``ShardUnitsLike``), innermost first, each once."""
    units: dict[int, nn.Module] = {}
    for module in model.modules():
        named = getattr(module, "shard_units", None)
        if module is not model and callable(named):
            for unit in named():
                units.setdefault(id(unit), unit)
    # A unit inside another unit is wrapped first (FSDP needs children before parents).
    return sorted(units.values(), key=lambda unit: sum(1 for _ in unit.modules()))


def cast_frozen(model: VLModel, dtype: torch.dtype) -> int:
    """Store the frozen weight matrices (ndim >= 2) in ``dtype``; returns how many were cast.

    Norm weights and biases (1-D) stay fp32: autocast runs layer norms in fp32 and
    refuses bf16 parameters there; matrix products cast their weights anyway. The EMA
    teacher stays fp32 too: it takes no gradients but is updated every step (its lerp
    towards the fp32 student needs matching dtypes, and bf16 would lose small updates).
    """
    teacher = {id(p) for p in model.teacher.parameters()} if model.teacher is not None else set()
    frozen = [
        p
        for p in model.parameters()
        if not p.requires_grad and p.is_floating_point() and p.ndim >= 2 and id(p) not in teacher
    ]
    for param in frozen:
        param.data = param.data.to(dtype)
    return len(frozen)


def apply(model: VLModel, recipe: Recipe, device: torch.device, world: int) -> nn.Module:
    """Wrap ``model`` (already on ``device``) for training on ``world`` ranks; returns what to call."""
    from vlforge.engine import uses_bf16

    train = recipe.train
    bf16 = uses_bf16(device, train.precision)
    if train.frozen_dtype == "bf16":
        if not bf16:
            raise ValueError(
                f"train.frozen_dtype = 'bf16' needs bf16 autocast (train.precision = 'bf16', or 'auto' "
                f"on CUDA); this run uses {train.precision} on {device.type}"
            )
        cast_frozen(model, torch.bfloat16)
    units = shard_units(model)
    if train.compile:
        from vlforge.parallel.compile import compile_units

        compile_units(units)
    if train.parallel == "fsdp":
        from vlforge.parallel.fsdp import shard

        return shard(model, units, bf16=bf16)
    if world == 1:
        return model
    from vlforge.parallel.ddp import replicate

    return replicate(model, device, train.ddp)


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of a micro-batch that is not the last."""
    if enabled:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:  # one process
        yield


# Devices with a fused AdamW kernel: one pass over each parameter, no temporaries. On CPU the
# multi-tensor path allocates a square root for every parameter at once and takes about 7x longer
# (bench/optimizer_step.py).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def optimizer_options(device: torch.device) -> dict[str, Any]:
    """Fused AdamW where the device has the kernel, the multi-tensor path elsewhere."""
    return {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}


def split_sharded(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups with sharded (DTensor) and whole parameters apart: a multi-tensor
    kernel takes one kind at a time (FSDP keeps 0-d parameters whole)."""
    from torch.distributed.tensor import DTensor

    split = []
    for group in groups:
        for sharded in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == sharded]
            if params:
                split.append({**group, "params": params})
    return split


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over every rank's shards; returns the norm (0-d, on device, no sync)."""
    from torch.distributed.tensor import DTensor

    from vlforge import distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(sharded)]).sum()
    total = dist.all_reduce(squares)  # every shard once
    if whole:  # replicated on every rank: counted once, not summed
        total = total + torch.stack([n.float() ** 2 for n in torch._foreach_norm(whole)]).sum()
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for group in (sharded, whole):
        if group:
            torch._foreach_mul_(group, scale.to(group[0].dtype))
    return norm

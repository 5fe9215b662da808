"""``train.parallel = "fsdp"``: FSDP2 ``fully_shard`` over every shard unit, then the root.

* Units come from the parts' ``shard_units()`` (``vlforge.components.ShardUnitsLike``),
  innermost first; what no unit holds (embeddings, heads, projections, an EMA
  teacher's leftovers) is sharded with the root, which is wrapped last.
* An EMA teacher whose parts are copies of the student's parts names the same
  units, so every momentum parameter is sharded exactly like its online twin
  and an element-wise update (``_foreach_lerp_``) works on the local shards.
* ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` when bf16
  autocast is on: unsharded parameters are gathered in bf16, gradients reduced in fp32.
* 0-d parameters (a logit scale, a temperature) cannot be sharded: they stay
  whole on every rank and their gradients are averaged by a hook after each backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlforge import distributed as dist


def shard(model: nn.Module, units: list[nn.Module], bf16: bool) -> nn.Module:
    """``fully_shard`` each unit, then ``model``; returns ``model`` (changed in place)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mp_policy": policy} if policy else {}
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for unit in units:
        fully_shard(unit, ignored_params=scalars, **options)
    fully_shard(model, ignored_params=scalars, **options)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_grad)
    return model


def _average_grad(param: torch.Tensor) -> None:
    """A whole (unsharded) parameter: average its gradient over ranks, as DDP would."""
    param.grad.copy_(dist.all_reduce_mean(param.grad))

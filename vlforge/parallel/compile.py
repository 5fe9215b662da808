"""``train.compile = true``: ``torch.compile`` each shard unit (a block), as torchtitan and open_clip do.

Compiling blocks rather than the whole model keeps the graphs small and
identical from block to block (one compilation reused), and leaves the
Python-level step (objectives, the shared-feature ``Step``, hooks) eager.
"""

from __future__ import annotations

from torch import nn


def compile_units(units: list[nn.Module]) -> None:
    """Compile every unit in place (``nn.Module.compile``): its ``forward`` runs the compiled graph."""
    for unit in units:
        unit.compile()

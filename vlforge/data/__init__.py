"""data components (registered by vlforge.builtin).

This module stays light (no torch import): it holds the config models and
registers factories that import the heavy code when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


class ShapesConfig(ComponentConfig):
    """``[data] type = "synthetic.shapes"``: generated images of one coloured shape."""

    seed: int = Field(0, ge=0, description="item i of a split is a pure function of (seed, split, i)")
    train_size: int = Field(20_000, ge=1, description="items in the 'train' split")
    val_size: int = Field(512, ge=1, description="items in the held-out 'val' split")
    test_size: int = Field(512, ge=1, description="items in the held-out 'test' split")
    image_size: int | None = Field(
        None, ge=8, description="side in pixels; default: the vision encoder's data_config input size"
    )
    background_noise: float = Field(
        0.05, ge=0.0, description="std of Gaussian pixel noise, in units of the full 0..255 range"
    )


def build_shapes(config: ShapesConfig, ctx: BuildContext) -> Any:
    """Generated images of one coloured shape, with captions that describe them exactly."""
    from vlforge.data.synthetic import ShapesData

    return ShapesData.from_context(config, ctx)


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""
    registry.add("dataset", "synthetic.shapes", config=ShapesConfig, factory=build_shapes)

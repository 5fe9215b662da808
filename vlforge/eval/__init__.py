"""eval components (registered by vlforge.builtin)."""

from vlforge.registry import Registry


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""

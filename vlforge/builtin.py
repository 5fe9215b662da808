"""Core components, always registered: generic encoders, datasets, evaluators, sinks.

Each package registers its own components from a light ``__init__`` (no torch
import); the heavy code is imported inside the factories.
"""

from vlforge.hookspecs import hookimpl
from vlforge.registry import Registry


@hookimpl
def vlforge_register_components(registry: Registry) -> None:
    from vlforge import data, encoders, eval, sinks

    encoders.register(registry)
    data.register(registry)
    eval.register(registry)
    sinks.register(registry)

"""Renaming state dicts between layouts: rules that map tensor names (and reshape tensors) both ways.

A ``Rule`` maps the tensors named by its ``sources`` patterns to those named by its
``targets`` patterns. Patterns name block indices ``{i}``, a parameter kind ``{p}``
(``weight`` or ``bias``) and ``{rest}`` (any remaining name); ``forward`` turns the
source tensors into the target tensors and ``backward`` undoes it, so one rule list
converts in both directions. Tensors no rule takes are returned by name
(``Converted.unused``), never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Tensors = list[torch.Tensor]
_GROUPS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def same(tensors: Tensors) -> Tensors:
    return tensors


def transpose(tensors: Tensors) -> Tensors:
    """(D, E) ``x @ proj`` matrices <-> (E, D) ``nn.Linear`` weights."""
    return [t.T.contiguous() for t in tensors]


def reshape_to(*shape: int) -> Callable[[Tensors], Tensors]:
    """A rule step that reshapes to ``shape`` (-1 allowed): (D,) <-> (1, 1, D) and the like."""
    return lambda tensors: [t.reshape(shape) for t in tensors]


def scalar(tensors: Tensors) -> Tensors:
    """A logit scale stored as (1,) or () -> ()."""
    return [tensors[0].reshape(())]


def split_qkv(tensors: Tensors) -> Tensors:
    """One fused (3D, ...) in-projection -> q, k, v, each (D, ...)."""
    return list(tensors[0].chunk(3, dim=0))


def fuse_qkv(tensors: Tensors) -> Tensors:
    return [torch.cat(tensors, dim=0)]


@dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    forward: Callable[[Tensors], Tensors] = same
    backward: Callable[[Tensors], Tensors] = same

    def reversed(self) -> Rule:
        return Rule(self.targets, self.sources, self.backward, self.forward)


def rename(source: str, target: str, forward=same, backward=same) -> Rule:
    return Rule((source,), (target,), forward, backward)


@dataclass
class Converted:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # source tensors that no rule maps


def _regex(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern)
    for name, group in _GROUPS.items():
        escaped = escaped.replace(re.escape(f"{{{name}}}"), group)
    return re.compile(escaped)


def convert(state: dict[str, torch.Tensor], rules: Sequence[Rule], reverse: bool = False) -> Converted:
    """Apply ``rules`` (or their inverses) to every tensor of ``state``."""
    out = Converted()
    used: set[str] = set()
    for rule in rules:
        rule = rule.reversed() if reverse else rule
        pattern = _regex(rule.sources[0])
        for key in list(state):
            match = pattern.fullmatch(key)
            if match is None:
                continue
            names = [source.format(**match.groupdict()) for source in rule.sources]
            if not all(name in state for name in names):
                continue  # an incomplete group stays unused and is reported
            tensors = rule.forward([state[name] for name in names])
            for target, tensor in zip(rule.targets, tensors, strict=True):
                out.state[target.format(**match.groupdict())] = tensor
            used.update(names)
    out.unused = [key for key in state if key not in used]
    return out


def with_prefix(prefix: str, rules: Sequence[Rule], side: str = "targets") -> list[Rule]:
    """``rules`` with ``prefix`` put before every pattern on one side ("sources" or "targets")."""
    out = []
    for rule in rules:
        names = getattr(rule, side)
        prefixed = tuple(prefix + name for name in names)
        out.append(
            Rule(prefixed, rule.targets, rule.forward, rule.backward)
            if side == "sources"
            else Rule(rule.sources, prefixed, rule.forward, rule.backward)
        )
    return out

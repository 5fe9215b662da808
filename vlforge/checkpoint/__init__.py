"""Checkpoints of a run: sharded DCP directories, committed atomically and checksummed.

Public API (other subsystems use only these):

* ``list_checkpoints(run_dir)`` -> ``[(step, url)]`` of committed checkpoints, oldest first;
* ``latest_checkpoint(run_dir)`` -> the newest whose files are all present (or None);
* ``resume_checkpoint(run_dir)`` -> the newest that verifies against its checksums, checked by
  every rank together; says which newer ones it skipped and why;
* ``load_model_weights(model, source)`` -> load saved weights into a built model;
* ``read_model_state(source)`` -> the full, unsharded model state dict, one process, on CPU;
* ``Checkpointer`` -> what ``Trainer.save``/``restore`` use to write and read.

``source`` is a checkpoint (directory or legacy ``.pt``) or a run directory (its latest).
See docs/checkpoints.md for the layout, the manifest and why.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from vlforge.checkpoint.layout import (
    MANIFEST,
    checkpoint_dir,
    is_legacy,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    step_of,
    verify,
)
from vlforge.errors import RunFailed, UserError

if TYPE_CHECKING:  # this package imports torch only when it is used (the CLI stays light)
    import torch
    from torch import nn

    from vlforge.checkpoint.store import Checkpointer


def __getattr__(name: str) -> Any:
    if name == "Checkpointer":
        from vlforge.checkpoint.store import Checkpointer

        return Checkpointer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Checkpointer",
    "checkpoint_dir",
    "is_legacy",
    "latest_checkpoint",
    "frozen_pretrained_keys",
    "list_checkpoints",
    "load_model_weights",
    "read_manifest",
    "read_model_state",
    "resume_checkpoint",
    "step_of",
    "verify",
]


class NoIntactCheckpoint(RunFailed):
    """Checkpoints exist, but every one of them is damaged."""


def resume_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint that verifies (sizes and sha256), or None if the run has none.

    Call on every rank: each verifies a share of the files. A damaged checkpoint is skipped,
    with a message on rank 0 naming it and what is wrong; if all are damaged this raises.
    """
    from vlforge import distributed as dist

    found = list_checkpoints(run_dir)
    skipped = []
    for _, url in reversed(found):
        mine = verify(url, share=(dist.rank(), dist.world_size()))
        problems = [problem for problem in dist.all_gather_object(mine) if problem]
        if not problems:
            if skipped and dist.rank() == 0:
                print(f"vlforge: resuming from {url}, the newest intact checkpoint", file=sys.stderr)
            return url
        skipped.append(url)
        if dist.rank() == 0:
            print(
                f"vlforge: checkpoint {url} is damaged ({problems[0]}); falling back to the one before",
                file=sys.stderr,
                flush=True,
            )
    if found:
        raise NoIntactCheckpoint(f"every checkpoint in {checkpoint_dir(run_dir)} is damaged; cannot resume")
    return None


def frozen_pretrained_keys(model: nn.Module) -> list[str]:
    """Model keys of frozen parameters that parts declare rebuilt from the recipe (``PretrainedLike``)."""
    from vlforge.components import PretrainedLike

    parameters = dict(model.named_parameters(remove_duplicate=False))
    keys = []
    for prefix, module in model.named_modules():
        if isinstance(module, PretrainedLike):
            for name in module.pretrained_parameters():
                key = f"{prefix}.{name}" if prefix else name
                if key in parameters and not parameters[key].requires_grad:
                    keys.append(key)
    return sorted(keys)


def resolve(source: str, key: str = "model.init_from") -> str:
    """A checkpoint URL from a checkpoint (directory or file) or a run directory (its latest);
    UserError naming ``key`` if there is none."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if fs.isfile(path) or fs.exists(f"{path}/{MANIFEST}"):
        return source.rstrip("/")
    url = latest_checkpoint(source)
    if url is None:
        raise UserError(f"{key}: no checkpoint in {source}")
    return url


def load_model_weights(model: nn.Module, source: str) -> None:
    """Load the model weights of a checkpoint (or a run directory's latest) into ``model``.

    Single process or every rank; ``model`` may be plain, DDP-wrapped's module or FSDP2-sharded.
    Every tensor must fit (strict), except frozen weights the checkpoint left out on purpose.
    """
    from vlforge.checkpoint import legacy, store

    url = resolve(source)
    if is_legacy(url):
        try:
            model.load_state_dict(legacy.load_checkpoint(url)["model"])
        except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
            raise UserError(f"model.init_from: {url} does not fit this model: {exc}") from None
        return
    problems = store.load_model(model, url)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"model.init_from: {url} does not fit this model: {shown}")


def read_model_state(source: str) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict of a checkpoint, in one process, on CPU.

    Frozen weights left out of the checkpoint (``manifest.json["excluded"]``) are not in it.
    """
    from vlforge.checkpoint import legacy, store

    url = resolve(source, key="checkpoint")
    return legacy.load_checkpoint(url)["model"] if is_legacy(url) else store.read_model(url)

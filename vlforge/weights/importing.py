"""``[model] init_from`` from open_clip, Hugging Face CLIP or vlforge sources (see the package doc)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlforge import checkpoint as ckpt
from vlforge.errors import UserError
from vlforge.weights.layouts import hf_clip_rules, open_clip_rules, text_prefix
from vlforge.weights.mapping import Rule, convert

EXPORT_MANIFEST = "vlforge.json"  # written by `vlforge export --format safetensors`
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# open_clip's own preference among the files of a folder (open_clip.factory._find_checkpoint_in_dir).
_OPEN_CLIP_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def load_init_weights(model: nn.Module, source: str) -> None:
    """Load ``source``'s weights into a built model (every rank may call it)."""
    path = Path(source)
    if "://" in source or _names_a_checkpoint(source):
        ckpt.load_model_weights(model, source)
    elif path.is_dir() and (path / EXPORT_MANIFEST).is_file():
        load_mapped(model, read_weights(path / "model.safetensors"), [], source, complete=("",))
    elif path.is_dir() and _hf_clip_folder(path):
        config = json.loads((path / "config.json").read_text())
        # transformers' CLIP default activation is quick_gelu
        check_activations(
            model,
            config.get("vision_config", {}).get("hidden_act", "quick_gelu"),
            config.get("text_config", {}).get("hidden_act", "quick_gelu"),
            source,
        )
        rules = hf_clip_rules(logit_scale_key(model, source), text_prefix(list(model.state_dict())))
        load_mapped(model, *_converted(_hf_weights(path), rules), source)
    elif path.is_dir() and (path / "open_clip_config.json").is_file():
        weights = next((path / n for n in _OPEN_CLIP_FILES if (path / n).is_file()), None)
        if weights is None:
            raise UserError(f"model.init_from: open_clip folder {source} holds none of {_OPEN_CLIP_FILES}")
        config = json.loads((path / "open_clip_config.json").read_text())
        activation = "quick_gelu" if config.get("model_cfg", config).get("quick_gelu") else "gelu"
        check_activations(model, activation, activation, source)
        load_open_clip(model, weights, source)
    elif path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
        load_open_clip(model, path, source)
    else:
        ckpt.load_model_weights(model, source)  # a run directory (or an error naming it)


def _names_a_checkpoint(source: str) -> bool:
    """Whether ``source`` is a vlforge checkpoint (``step_XXXXXXXX`` directory or legacy file)."""
    try:
        ckpt.step_of(source)
    except ValueError:
        return False
    return True


def vision_activation(vision: nn.Module) -> str:
    """A timm ViT's MLP activation in transformers' / open_clip's words ("gelu", "quick_gelu")."""
    name = type(vision.vit.blocks[0].mlp.act).__name__
    return {"GELU": "gelu", "QuickGELU": "quick_gelu"}.get(name, name)


def check_activations(model: nn.Module, vision: str, text: str, source: str) -> None:
    """Weights never say which activation they were trained with; the source's config does."""
    ours = {"vision": vision_activation(model.vision), "text": model.text.model.config.hidden_act}
    wrong = [
        f"model.{part} uses {ours[part]}, the source {want}"
        for part, want in (("vision", vision), ("text", text))
        if ours[part] != want
    ]
    if wrong:
        hint = "set model.vision.timm_kwargs = {act_layer = '...'} and model.text.config.hidden_act"
        raise UserError(f"model.init_from: {source}: activations differ: {'; '.join(wrong)} ({hint})")


def load_open_clip(model: nn.Module, weights: Path, source: str) -> None:
    state = read_weights(weights)
    if isinstance(state.get("model"), dict) and "progress" in state:  # a vlforge checkpoint, renamed
        ckpt.load_model_weights(model, str(weights))
        return
    state = state.get("state_dict", state)  # open_clip's training checkpoints wrap it
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if not any(key.startswith("visual.") for key in state):
        raise UserError(
            f"model.init_from: {source} is neither an open_clip state dict (no 'visual.*' tensors) nor a "
            "vlforge checkpoint"
        )
    rules = open_clip_rules(logit_scale_key(model, source), text_prefix(list(model.state_dict())))
    load_mapped(model, *_converted(state, rules), source)


def read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _hf_clip_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"


def _hf_weights(path: Path) -> dict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights(path / name)
    raise UserError(
        f"model.init_from: Hugging Face CLIP folder {path} has no model.safetensors or pytorch_model.bin"
    )


def _converted(state: dict, rules: list[Rule]) -> tuple[dict, list[str]]:
    converted = convert(state, rules)
    return converted.state, converted.unused


def logit_scale_key(model: nn.Module, source: str) -> str:
    """The state-dict name of the model's one learnable logit scale (``clip.infonce``)."""
    keys = [name for name, _ in model.named_parameters() if name.endswith(".logit_scale")]
    if len(keys) != 1:
        raise UserError(
            f"model.init_from: {source} holds a CLIP logit scale; the model needs exactly one objective with "
            f"a logit_scale (clip.infonce) to take it, found {keys or 'none'}"
        )
    return keys[0]


def _names(keys: list[str], n: int = 12) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_mapped(
    model: nn.Module,
    state: dict,
    unused: list[str],
    source: str,
    complete: tuple[str, ...] = ("vision.", "text."),
) -> None:
    """Load tensors already in vlforge names; every problem is reported by tensor name at once.

    The model's tensors under ``complete`` (by default the vision and text towers) must all be
    in ``state``; other parts (an objective's other parameters, a fusion module) keep their
    initial weights.
    """
    own = model.state_dict()
    problems = []
    if unused:
        problems.append(f"tensors of the source that map to nothing in vlforge: {_names(unused)}")
    unknown = [key for key in state if key not in own]
    if unknown:
        problems.append(
            f"tensors this model does not have (check the recipe's architecture): {_names(unknown)}"
        )
    wrong = [
        f"{key} {tuple(value.shape)} in the source, {tuple(own[key].shape)} here"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    if wrong:
        problems.append(f"shapes differ: {_names(wrong, 6)}")
    towers = [key for key in own if key.startswith(complete) and key not in state]
    if towers:
        problems.append(f"tensors of this model's towers missing from the source: {_names(towers)}")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"model.init_from: {source} does not fit this model:\n{listing}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)

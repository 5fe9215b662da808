"""``vlforge export``: a trained model as a Hugging Face CLIP folder, an open_clip folder, or safetensors.

Every format writes the weights, the tokenizer files and the preprocessing (image size,
mean, std, interpolation). ``hf-clip`` and ``open_clip`` hold a CLIP: a ViT in CLIP's
layout, a CLIP text transformer and a logit scale (vlforge.weights.layouts); whatever
else the model has, or a tower in another layout, is refused with the reasons, all at
once. ``safetensors`` holds every part, with the resolved recipe that rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlforge.errors import UserError
from vlforge.weights.importing import EXPORT_MANIFEST, logit_scale_key, vision_activation
from vlforge.weights.layouts import hf_clip_rules, open_clip_rules, text_prefix
from vlforge.weights.mapping import Rule, convert

_ACTIVATIONS = ("gelu", "quick_gelu")  # what both formats can name
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def run_recipe_of(source: str) -> str:
    """The ``recipe.toml`` of the run a checkpoint (file or folder, path or URL) or run directory is in."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    folder = path.rstrip("/")
    for _ in range(4):  # the run, its checkpoints/, a checkpoint, a file inside a checkpoint folder
        if fs.isfile(f"{folder}/recipe.toml"):
            return fs.unstrip_protocol(f"{folder}/recipe.toml")
        folder = folder.rsplit("/", 1)[0]
    raise UserError(f"export: {source} is not a run directory or a checkpoint inside one (no recipe.toml)")


def load_trained(source: str) -> tuple[Any, nn.Module]:
    """(recipe, model in eval mode on CPU with the checkpoint's weights)."""
    from vlforge.checkpoint import read_model_state
    from vlforge.components import BuildContext
    from vlforge.model import build_model
    from vlforge.recipe import load_recipe

    recipe, plugins = load_recipe(run_recipe_of(source))
    model = build_model(recipe, plugins, BuildContext(recipe))
    model.load_state_dict(read_model_state(source))
    return recipe, model.eval()


def export(source: str, fmt: str, out: str) -> list[Path]:
    """Write ``source``'s model to the folder ``out`` in ``fmt``; returns the files written."""
    recipe, model = load_trained(source)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    EXPORTERS[fmt](recipe, model, folder)
    return sorted(set(folder.iterdir()) - before) or sorted(folder.iterdir())


# --------------------------------------------------------------------------- what a CLIP format holds


def clip_problems(model: nn.Module, fmt: str) -> list[str]:
    """Why ``model`` is not a CLIP that ``fmt`` can hold (empty: it is)."""
    problems = [
        f"model.{part} ({type(getattr(model, part)).__name__}) has no place in {fmt}"
        for part in ("adapter", "fusion")
        if getattr(model, part, None) is not None
    ]
    problems += _vision_problems(getattr(model, "vision", None))
    problems += _text_problems(getattr(model, "text", None))
    if not problems and model.vision.embed_dim != model.text.embed_dim:
        problems.append("model.vision.embed_dim and model.text.embed_dim differ")
    if (
        not problems
        and vision_activation(model.vision) != model.text.model.config.hidden_act
        and fmt == "open_clip"
    ):
        problems.append("open_clip uses one activation for both towers; vision and text differ")
    return problems


def _vision_problems(vision: Any) -> list[str]:
    vit = getattr(vision, "vit", None)
    if vit is None:
        return ["model.vision must be a timm.vit"]
    checks = {
        "a pre-norm (ln_pre: a timm *_clip_* model, or timm_kwargs {pre_norm = true})": isinstance(
            vit.norm_pre, nn.LayerNorm
        ),
        "no patch-embedding bias": vit.patch_embed.proj.bias is None,
        "a class token with its position embedding": vit.cls_token is not None and not vit.no_embed_class,
        "no register tokens": vit.num_reg_tokens == 0,
        "pool = 'token'": vit.global_pool == "token" and isinstance(vit.fc_norm, nn.Identity),
        "embed_dim > 0": vision.proj is not None,
        "GELU or QuickGELU activations": vision_activation(vision) in _ACTIVATIONS,
        "no layer scale or q/k norm": isinstance(vit.blocks[0].ls1, nn.Identity)
        and isinstance(vit.blocks[0].attn.q_norm, nn.Identity),
    }
    return [f"model.vision needs {need}" for need, ok in checks.items() if not ok]


def _text_problems(text: Any) -> list[str]:
    config = getattr(getattr(text, "model", None), "config", None)
    if getattr(config, "model_type", None) != "clip_text_model":
        kind = getattr(config, "model_type", type(text).__name__)
        return [f"model.text must be hf.text with config.model_type = 'clip_text_model' (this one: {kind})"]
    problems = (
        [] if text.pool_type == "last" else ["model.text needs pool = 'last' (CLIP pools the EOS token)"]
    )
    return problems + ([] if text.proj is not None else ["model.text needs embed_dim > 0"])


def _refuse_unless_clip(model: nn.Module, fmt: str) -> None:
    problems = clip_problems(model, fmt)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise UserError(
            f"export --format {fmt}: this model is not a CLIP that {fmt} can hold:\n{listing}\n"
            "(`--format safetensors` exports every part)"
        )


def _clip_state(
    model: nn.Module, rules: Callable[[str, str], list[Rule]], fmt: str
) -> dict[str, torch.Tensor]:
    """The towers' and logit scale's tensors in ``fmt``'s names; any tensor left over is refused."""
    key = logit_scale_key(model, f"export --format {fmt}")
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision.", "text.")) or k == key}
    converted = convert(state, rules(key, text_prefix(list(state))), reverse=True)
    if converted.unused:
        raise UserError(f"export --format {fmt}: no place for {', '.join(converted.unused)}")
    return {name: tensor.contiguous() for name, tensor in converted.state.items()}


def _vision_facts(model: nn.Module) -> dict[str, Any]:
    vit = model.vision.vit
    block = vit.blocks[0]
    data = model.vision.data_config
    return {
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "width": vit.embed_dim,
        "layers": len(vit.blocks),
        "heads": block.attn.num_heads,
        "mlp_width": block.mlp.fc1.out_features,
        "eps": block.norm1.eps,
        "act": vision_activation(model.vision),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "interpolation": data["interpolation"],
    }


def _preprocessing(facts: dict[str, Any]) -> dict[str, Any]:
    keys = ("image_size", "mean", "std", "interpolation")
    return {key: facts[key] for key in keys} | {"resize": "shortest side, then centre crop"}


# --------------------------------------------------------------------------- formats


def to_hf_clip(recipe: Any, model: nn.Module, folder: Path) -> None:
    """``config.json`` + ``model.safetensors`` (CLIPModel), tokenizer files, ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    _refuse_unless_clip(model, "hf-clip")
    state = _clip_state(model, hf_clip_rules, "hf-clip")
    v = _vision_facts(model)
    vision_config = {
        "hidden_size": v["width"],
        "intermediate_size": v["mlp_width"],
        "num_hidden_layers": v["layers"],
        "num_attention_heads": v["heads"],
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "hidden_act": v["act"],
        "layer_norm_eps": v["eps"],
    }
    config = CLIPConfig(
        text_config=model.text.model.config.to_dict(),
        vision_config=vision_config,
        projection_dim=model.vision.embed_dim,
        logit_scale_init_value=float(state["logit_scale"]),
    )
    clip = CLIPModel(config)
    result = clip.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # a layout check above missed something
        raise UserError(
            f"export --format hf-clip: CLIPModel misses {result.missing_keys}, "
            f"does not take {result.unexpected_keys}"
        )
    clip.save_pretrained(folder, safe_serialization=True)
    model.text.tokenizer.save_pretrained(folder)
    size = v["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=v["mean"],
        image_std=v["std"],
        resample=_PIL_RESAMPLE.get(v["interpolation"], 3),
    ).save_pretrained(folder)


def to_open_clip(recipe: Any, model: nn.Module, folder: Path) -> None:
    """``open_clip_config.json`` + ``open_clip_model.safetensors`` + tokenizer files.

    Load with ``open_clip.create_model_and_transforms("local-dir:FOLDER")``. Texts are pooled at the
    tokenizer's EOS id (open_clip ``pool_type = "eos"``), which is vlforge's last real token.
    """
    from safetensors.torch import save_file

    _refuse_unless_clip(model, "open_clip")
    state = _clip_state(model, open_clip_rules, "open_clip")
    v = _vision_facts(model)
    text_config = model.text.model.config
    tokenizer = model.text.tokenizer
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    model_cfg = {
        "embed_dim": model.vision.embed_dim,
        "quick_gelu": v["act"] == "quick_gelu",
        "vision_cfg": {
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "width": v["width"],
            "layers": v["layers"],
            "head_width": v["width"] // v["heads"],
            "mlp_ratio": v["mlp_width"] / v["width"],
            "norm_kwargs": {"eps": v["eps"]},
        },
        "text_cfg": {
            "context_length": text_config.max_position_embeddings,
            "vocab_size": text_config.vocab_size,
            "width": text_config.hidden_size,
            "heads": text_config.num_attention_heads,
            "layers": text_config.num_hidden_layers,
            "mlp_ratio": text_config.intermediate_size / text_config.hidden_size,
            "pool_type": "eos",
            "eos_id": eos,
            "pad_id": tokenizer.pad_token_id or 0,
            "norm_kwargs": {"eps": text_config.layer_norm_eps},
            # open_clip's local-dir: loads the tokenizer files from the folder itself
            "hf_tokenizer_name": ".",
        },
    }
    preprocess_cfg = {
        "mean": v["mean"],
        "std": v["std"],
        "interpolation": v["interpolation"],
        "resize_mode": "shortest",
    }
    save_file(state, str(folder / "open_clip_model.safetensors"))
    tokenizer.save_pretrained(folder)
    manifest = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(manifest, indent=2) + "\n")


def to_safetensors(recipe: Any, model: nn.Module, folder: Path) -> None:
    """Every part: ``model.safetensors`` (vlforge's names), ``recipe.toml``, ``vlforge.json``, tokenizer."""
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "recipe.toml").write_text(recipe.to_toml())
    if getattr(model, "text", None) is not None and hasattr(model.text, "tokenizer"):
        model.text.tokenizer.save_pretrained(folder / "tokenizer")
    parts = {
        name: f"{type(module).__module__}.{type(module).__name__}" for name, module in model.named_children()
    }
    vision = getattr(model, "vision", None)
    manifest = {
        "format": "vlforge-safetensors",
        "vlforge_version": _version(),
        "rebuild": "build recipe.toml with vlforge and load model.safetensors into it: "
        "`vlforge run recipe.toml model.init_from=<this folder>`, or "
        "vlforge.weights.load_init_weights(model, '<this folder>'); tensor names are VLModel.state_dict()'s",
        "parts": parts,
        "tensors": len(state),
        "preprocessing": _preprocessing(_vision_facts(model)) if hasattr(vision, "vit") else None,
    }
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _version() -> str:
    from vlforge import __version__

    return __version__


EXPORTERS: dict[str, Callable[[Any, nn.Module, Path], None]] = {
    "hf-clip": to_hf_clip,
    "open_clip": to_open_clip,
    "safetensors": to_safetensors,
}

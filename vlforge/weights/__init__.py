"""Weights in and out: open_clip and Hugging Face CLIP checkpoints as ``model.init_from``, and exports.

``vlforge.weights.importing.load_init_weights(model, source)`` is what ``[model] init_from``
calls. ``source`` is

* a vlforge checkpoint or run directory (``vlforge.checkpoint.load_model_weights``);
* a folder written by ``vlforge export --format safetensors`` (``vlforge.json`` inside);
* a Hugging Face CLIP folder (``config.json`` with ``model_type = "clip"`` and
  ``model.safetensors`` or ``pytorch_model.bin``);
* an open_clip checkpoint: a weights file (``.safetensors``/``.bin``/``.pt``/``.pth``, a
  bare state dict or open_clip's training checkpoint with ``state_dict``) or an open_clip
  folder (``open_clip_config.json`` beside the weights).

The mapping onto vlforge's components is in ``vlforge.weights.layouts`` (docs/weights.md).
Tensors of the source that nothing maps, tensors of the model's vision and text towers
that the source lacks, and shape mismatches all fail the load, each listed by name.
"""
# Nothing is imported here: `vlforge export`'s command module lives in this package and the CLI
# must stay free of torch until a command runs.

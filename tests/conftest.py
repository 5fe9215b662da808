"""Shared fixtures: a tiny valid recipe, files in tmp dirs, an isolated runs root."""
# ruff: noqa: E501  (the tiny recipe text keeps its one-line inline tables)

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A complete, tiny CLIP recipe: every component is real (timm ViT, transformers BERT,
# generated data), just small enough to train a few steps in seconds on a CPU.
TINY_RECIPE = """
name = "tiny"
experiment = "tests"
seed = 0

[model.vision]
type = "timm.vit"
model = "vit_tiny_patch16_224"
img_size = 32
patch_size = 8
width = 32
depth = 2
heads = 2
embed_dim = 32

[model.text]
type = "hf.text"
config = { model_type = "bert", hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 32 }
tokenizer = "vlforge:shapes"
max_length = 16
embed_dim = 32

[objectives.contrastive]
type = "clip.infonce"

[data]
type = "synthetic.shapes"
train_size = 512
val_size = 64
test_size = 64

[evaluators.retrieval]
type = "retrieval"

[optim]
lr = 1e-3

[train]
steps = 6
batch_size = 16
log_every = 1
checkpoint_every = 3
progress = false
"""


@pytest.fixture
def write(tmp_path: Path):
    """write("name.toml", text) -> path of a dedented file under tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return _write


@pytest.fixture
def tiny_recipe(write) -> Path:
    return write("tiny.toml", TINY_RECIPE)


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("VLFORGE_RUNS", str(root))
    return root


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """install_plugin("name", source) -> 'plugins=["name"]': a one-file plugin module that this
    process and the processes it starts (spawned ranks, Slurm jobs: PYTHONPATH) import by name."""

    def _install(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        return f'plugins=["{name}"]'

    return _install


@pytest.fixture(autouse=True)
def thread_settings_unchanged():
    """Fails the test that leaves another intra-op thread count behind. Float sums depend on it,
    and tests compare a run in this process bitwise with runs in subprocesses and Slurm jobs,
    which take OMP_NUM_THREADS from this environment."""
    import torch

    before = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    yield
    after = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    assert after == before, f"(OMP_NUM_THREADS, torch threads) changed from {before} to {after}"

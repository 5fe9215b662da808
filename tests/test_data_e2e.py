"""WebDataset shards end to end through `vlforge run`: exact resume, data counters, the bad-data stop."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from vlforge.cli import main
from vlforge.data.pack import pack, write_shapes_folder
from vlforge.results.queries import query

# An objective that records the keys of every micro-batch it trains on and can send
# this process SIGINT after a given step (a deterministic Ctrl-C).
RECORDING_PLUGIN = """
import json, os, signal
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig

class Config(ComponentConfig):
    keys_file: str
    interrupt_after_step: int = -1

def build(config, ctx):
    from torch import nn
    from vlforge_plugins.clip import InfoNCEConfig, build_infonce

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_infonce(InfoNCEConfig(), ctx)

        def forward(self, step):
            with open(config.keys_file, "a") as out:
                out.write(json.dumps([step.progress.step, step.batch["keys"]]) + "\\n")
            return self.inner(step)

        @hookimpl
        def vlforge_after_optimizer_step(self, state):
            if state.step == config.interrupt_after_step:
                os.kill(os.getpid(), signal.SIGINT)

    return Recording()

@hookimpl
def vlforge_register_components(registry):
    registry.add("objective", "test.recording_clip", config=Config, factory=build)
"""


@pytest.fixture
def wds_recipe(tmp_path, install_plugin, write, tiny_recipe):
    """The tiny recipe on 8 packed shards of 6 shapes (train) + 1 (val), two workers, 8 steps of 8."""
    write_shapes_folder(tmp_path / "images", 54, image_size=32)
    pack(str(tmp_path / "images"), str(tmp_path / "shards"), shard_size=6, progress=False)
    install_plugin("data_e2e_plugin", RECORDING_PLUGIN)
    base = (
        tiny_recipe.read_text()
        .split("[data]")[0]
        .replace('type = "clip.infonce"', 'type = "test.recording_clip"')
    )
    return write(
        "wds.toml",
        f"""
        plugins = ["data_e2e_plugin"]
        {textwrap.indent(base, "        ").strip()}
        keys_file = "{tmp_path}/keys.jsonl"

        [data]
        type = "webdataset"
        urls = "{tmp_path}/shards/{{00000..00007}}.tar"
        splits = {{ val = "{tmp_path}/shards/00008.tar" }}
        shuffle_block = 4
        image = {{ crop_scale = [0.5, 1.0], hflip = 0.5 }}

        [evaluators.retrieval]
        type = "retrieval"

        [train]
        steps = 8
        batch_size = 8
        log_every = 1
        checkpoint_every = 4
        num_workers = 2
        progress = false
        """,
    )


def recorded(path) -> list[tuple[int, list[str]]]:
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return [tuple(json.loads(line)) for line in lines]


@pytest.mark.slow
def test_interrupted_and_resumed_run_sees_the_same_samples(wds_recipe, runs_root, tmp_path):
    keys_file = tmp_path / "keys.jsonl"
    assert main(["run", str(wds_recipe)]) == 0
    uninterrupted = recorded(keys_file)
    assert [step for step, _ in uninterrupted] == list(range(8))
    seen = [key for _, keys in uninterrupted for key in keys]
    assert len(set(seen[:48])) == 48  # the first epoch (6 steps) holds every train sample once

    assert main(["run", str(wds_recipe), "objectives.contrastive.interrupt_after_step=3"]) == 130
    assert main(["run", str(wds_recipe), "--resume"]) == 0
    assert recorded(keys_file) == uninterrupted  # same keys, same order, no step twice

    rows = json.loads(query(str(runs_root), "SELECT run_id FROM runs ORDER BY start_time", "json"))
    resumed = rows[-1]["run_id"]
    sql = (
        f"SELECT step, value FROM metrics WHERE run_id = '{resumed}' AND name = 'data/samples' ORDER BY step"
    )
    samples = json.loads(query(str(runs_root), sql, "json"))
    assert [(r["step"], r["value"]) for r in samples] == [(s, 8.0 * s) for s in range(1, 9)]  # counts resumed


@pytest.mark.slow
def test_run_stops_on_too_much_bad_data_with_a_clear_message(wds_recipe, runs_root, tmp_path, capsys):
    (tmp_path / "shards" / "00000.tar").write_bytes(b"\0" * 600)  # one shard is junk
    code = main(
        [
            "run",
            str(wds_recipe),
            "train.num_workers=0",
            "data.bad_data.min_samples=8",
            "data.bad_data.max_failed_shard_fraction=0.05",
        ]
    )
    assert code == 1
    message = capsys.readouterr().err
    assert re.search(r"1 of \d+ shards could not be read.*max_failed_shard_fraction = 0.05", message)


@pytest.mark.slow
def test_a_run_on_a_caption_file_with_bad_lines_skips_counts_and_names_them(
    tmp_path, runs_root, tiny_recipe, caplog
):
    images = write_shapes_folder(tmp_path / "images", 16, image_size=32)
    lines = [
        json.dumps({"image": i.name, "caption": i.with_suffix(".txt").read_text()}).encode() for i in images
    ]
    bad = {  # line number -> the line and what the warning says about it
        5: (b'{"image": "000004.jpg", "caption": "cut', "not JSON"),
        9: (b'{"image": "000004.jpg", "caption": 12345}', "the caption is not text"),
        13: (b'{"image": "000004.jpg", "caption": "caf\xe9"}', "not UTF-8 (byte 0xe9"),
        17: (b'{"caption": "no image"}', "no 'image' path"),
    }
    for number in sorted(bad):
        lines.insert(number - 1, bad[number][0])
    captions = tmp_path / "images" / "captions.jsonl"
    captions.write_bytes(b"\n".join(lines) + b"\n")
    data = (
        f'data={{type="captions", files="{captions}", shuffle=false, bad_data={{max_skipped_fraction=0.5}}}}'
    )
    overrides = ["~evaluators.retrieval", data, "train.steps=2", "train.batch_size=8", "train.num_workers=0"]

    assert main(["run", str(tiny_recipe), *overrides]) == 0  # bad lines do not stop the run
    for number, (_, what) in bad.items():
        assert f"data: skipping {captions}:line {number}: {what}" in caplog.text
    counters = json.loads(
        query(
            str(runs_root),
            "SELECT name, max(value) AS value FROM metrics WHERE name LIKE 'data/%' GROUP BY name",
            "json",
        )
    )
    counters = {row["name"]: row["value"] for row in counters}
    assert counters["data/skipped_bad_line"] == 2 and counters["data/skipped_bad_entry"] == 2
    assert counters["data/samples"] == 16  # every good line trained on: 2 steps of 8

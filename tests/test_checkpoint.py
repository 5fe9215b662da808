"""Checkpoints: manifest and checksums, fallback to the newest intact one, kill -9 mid-save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.results.queries import query

from .test_engine import losses, run_ids, test_plugin  # noqa: F401 (a fixture)


def save_three(run_dir: str, keep: int = 3) -> nn.Module:
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = ckpt.Checkpointer(run_dir, keep=keep)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        saver.save(step, model, optimizer, {"step": step})
    return model


def biggest_shard(url: str) -> Path:
    return max((p for p in Path(url).iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_400_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    path.write_bytes(bytes(data))


def test_manifest_records_every_part_and_keep_prunes(tmp_path):
    run_dir = str(tmp_path / "run")
    save_three(run_dir, keep=2)
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    manifest = ckpt.read_manifest(ckpt.latest_checkpoint(run_dir))
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["format"] == 2
    on_disk = {p.name: p.stat().st_size for p in Path(ckpt.latest_checkpoint(run_dir)).iterdir()}
    assert {name: part["size"] for name, part in manifest["parts"].items()} == {
        name: size for name, size in on_disk.items() if name != "manifest.json"
    }
    assert all(len(part["sha256"]) == 64 for part in manifest["parts"].values())
    assert manifest["bytes"] == sum(part["size"] for part in manifest["parts"].values())


@pytest.mark.parametrize("damage", [truncate, flip_400_bytes])
def test_resume_checkpoint_skips_a_damaged_latest_and_says_why(tmp_path, capsys, damage):
    run_dir = str(tmp_path / "run")
    save_three(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    damage(biggest_shard(latest))
    assert ckpt.verify(latest) is not None
    chosen = ckpt.resume_checkpoint(run_dir)
    assert ckpt.step_of(chosen) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged" in err and "falling back" in err
    expected = "truncated" if damage is truncate else "sha256"
    assert expected in err
    assert ckpt.read_model_state(chosen)["weight"].eq(2).all()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    run_dir = str(tmp_path / "run")
    save_three(run_dir)
    for _, url in ckpt.list_checkpoints(run_dir):
        flip_400_bytes(biggest_shard(url))
    with pytest.raises(ckpt.NoIntactCheckpoint, match="every checkpoint"):
        ckpt.resume_checkpoint(run_dir)


def test_load_model_weights_names_mismatched_tensors(tmp_path):
    from vlforge.errors import UserError

    run_dir = str(tmp_path / "run")
    save_three(run_dir)
    model = nn.Linear(64, 64)
    ckpt.load_model_weights(model, run_dir)
    assert model.weight.eq(3).all()
    with pytest.raises(UserError, match=r"weight: saved \(64, 64\), model \(32, 64\)"):
        ckpt.load_model_weights(nn.Linear(64, 32), run_dir)


# --------------------------------------------------------------------------- end to end


def train_loss_rows(run_dir: Path) -> list[int]:
    """Steps of the train/loss rows in a run's metric chunks (what a kill -9 leaves on disk)."""
    rows = [json.loads(line) for chunk in (run_dir / "metrics").glob("*.jsonl") for line in chunk.open()]
    return sorted(row["step"] for row in rows if row["name"] == "train/loss")


def steps_logged_twice(root: Path, run_id: str) -> list[int]:
    rows = json.loads(
        query(
            str(root),
            f"SELECT step FROM metrics WHERE run_id = '{run_id}' AND name = 'train/loss' "
            "GROUP BY step HAVING count(*) > 1",
            "json",
        )
    )
    return [row["step"] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip_400_bytes])
def test_damaged_latest_falls_back_and_the_run_matches_the_uninterrupted_one(
    tiny_recipe,
    runs_root,
    test_plugin,  # noqa: F811 (the fixture imported above)
    capfd,
    damage,
):
    every_2 = [*test_plugin, "train.checkpoint_every=2"]
    assert main(["run", str(tiny_recipe), *every_2]) == 0
    (reference,) = run_ids(runs_root)
    assert main(["run", str(tiny_recipe), *every_2, "objectives.contrastive.interrupt_after_step=4"]) == 130
    (run_id,) = set(run_ids(runs_root)) - {reference}
    run_dir = next(runs_root.glob(f"*/{run_id}"))
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [2, 4]
    damage(biggest_shard(ckpt.latest_checkpoint(str(run_dir))))
    capfd.readouterr()

    resume = ["run", str(tiny_recipe), *every_2, "objectives.contrastive.interrupt_after_step=4", "--resume"]
    assert main(resume) == 130  # from step 2, so the plugin interrupts at step 4 once more
    err = capfd.readouterr().err
    assert "step_00000004 is damaged" in err and "resuming from" in err and "step_00000002" in err
    assert main(resume) == 0  # from the new, intact step 4
    assert losses(runs_root, run_id) == losses(runs_root, reference)  # bitwise, steps 1..6
    assert steps_logged_twice(runs_root, run_id) == []


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_fails_clearly_and_keeps_everything(
    tiny_recipe,
    runs_root,
    test_plugin,  # noqa: F811 (the fixture imported above)
    capfd,
):
    args = [
        str(tiny_recipe),
        *test_plugin,
        "train.checkpoint_every=2",
        "objectives.contrastive.interrupt_after_step=4",
    ]
    assert main(["run", *args]) == 130
    (run_id,) = run_ids(runs_root)
    run_dir = next(runs_root.glob(f"*/{run_id}"))
    for _, url in ckpt.list_checkpoints(str(run_dir)):
        flip_400_bytes(biggest_shard(url))
    checkpoints = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    capfd.readouterr()

    assert main(["run", *args, "--resume"]) == 1  # never a silent fresh start
    err = capfd.readouterr().err
    assert f"every checkpoint in {run_dir / 'checkpoints'} is damaged; cannot resume" in err
    assert "step_00000004 is damaged" in err and "step_00000002 is damaged" in err
    assert "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "every checkpoint" in status["reason"]
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()} == checkpoints
    assert train_loss_rows(run_dir) == [1, 2, 3, 4]  # the first attempt's metrics are all kept


# A run that SIGKILLs itself at a given point of its second checkpoint (step 4 of 6).
KILLER = """
import os, signal, sys
from vlforge.checkpoint import layout, store

point, calls = os.environ["KILL_AT"], []

def killing(function):
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

if point == "start":  # before anything of it is written
    store.Checkpointer._prepare = killing(store.Checkpointer._prepare)
elif point in ("shards", "async shards"):  # shards written, not yet hashed or committed
    layout.write_rank_parts = killing(layout.write_rank_parts)
elif point == "committed":  # renamed into place, older ones not yet pruned
    layout.prune = killing(layout.prune)

from vlforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["start", "shards", "committed", "async shards"])
def test_kill_9_during_a_save_loses_no_metric_and_resume_continues(tiny_recipe, runs_root, tmp_path, point):
    args = [str(tiny_recipe), "train.checkpoint_every=2", "train.keep_checkpoints=1"]
    if point.startswith("async"):  # killed in the thread writing step 4 while training goes on
        args.append("train.async_checkpoint=true")
    assert main(["run", *args]) == 0
    (reference,) = run_ids(runs_root)
    killer = tmp_path / "killer.py"
    killer.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "KILL_AT": point}
    done = subprocess.run(
        [sys.executable, str(killer), "run", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == -9, done.stderr
    (run_dir,) = [d for d in runs_root.glob("tests/*") if d.name != reference]
    rows = train_loss_rows(run_dir)
    assert rows[:4] == [1, 2, 3, 4]  # flushed before the checkpoint of step 4
    assert rows == sorted(set(rows))
    latest = ckpt.resume_checkpoint(str(run_dir))
    assert ckpt.step_of(latest) == (4 if point == "committed" else 2)

    assert main(["run", *args, "--resume"]) == 0
    assert losses(runs_root, run_dir.name) == losses(runs_root, reference)
    assert steps_logged_twice(runs_root, run_dir.name) == []
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [6]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # a crashed save's leftovers are gone


@pytest.mark.slow
def test_async_checkpoints_of_two_ranks_resume_on_one(tiny_recipe, runs_root, test_plugin, capfd):  # noqa: F811
    args = [*test_plugin, "train.checkpoint_every=2", "train.async_checkpoint=true"]
    interrupted = [*args, "objectives.contrastive.interrupt_after_step=5", "launch.nproc=2"]
    assert main(["run", str(tiny_recipe), *interrupted]) == 130
    (run_id,) = run_ids(runs_root)
    run_dir = next(runs_root.glob(f"*/{run_id}"))
    latest = ckpt.latest_checkpoint(str(run_dir))
    assert ckpt.read_manifest(latest)["world_size"] == 2 and ckpt.step_of(latest) == 5
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))] == [4, 5]  # the async one of 4 committed
    flip_400_bytes(Path(latest) / "__1_0.distcp")  # what rank 1 wrote is checked like rank 0's
    capfd.readouterr()

    resume = ["run", str(tiny_recipe), *args, "launch.nproc=1", "--resume"]
    assert main(resume) == 130  # from step 4, so the plugin interrupts at step 5 once more
    err = capfd.readouterr().err
    assert f"checkpoint {latest} is damaged (__1_0.distcp does not match its sha256 checksum" in err
    assert "resuming from" in err and "step_00000004" in err
    assert main(resume) == 0  # from the new, intact step 5
    assert sorted(losses(runs_root, run_id)) == [1, 2, 3, 4, 5, 6]
    assert steps_logged_twice(runs_root, run_id) == []
    assert ckpt.read_manifest(ckpt.latest_checkpoint(str(run_dir)))["world_size"] == 1


# --------------------------------------------------------------------------- commands, legacy


def test_inspect_and_consolidate(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    save_three(run_dir)
    assert main(["checkpoint", "inspect", run_dir, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "step 3, saved at world size 1" in out and "in 3 parts" in out and "__0_0.distcp" in out
    assert out.count("intact (sha256 checked)") == 3

    output = tmp_path / "one.pt"
    assert main(["checkpoint", "consolidate", run_dir, "-o", str(output)]) == 0
    whole = torch.load(output, weights_only=False)
    assert whole["step"] == 3 and whole["optimizer"]["state"]["weight"]["exp_avg"].shape == (64, 64)
    for key, value in ckpt.read_model_state(run_dir).items():
        assert torch.equal(ckpt.read_model_state(str(output))[key], value)

    flip_400_bytes(biggest_shard(ckpt.latest_checkpoint(run_dir)))
    assert main(["checkpoint", "inspect", ckpt.latest_checkpoint(run_dir), "--verify"]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["checkpoint", "consolidate", run_dir, "-o", str(output)]) == 2
    assert main(["checkpoint", "inspect", "no-such-run"]) == 2


@pytest.mark.slow
def test_a_checkpoint_of_the_single_file_format_still_resumes(
    tiny_recipe,
    runs_root,
    test_plugin,  # noqa: F811 (the fixture imported above)
):
    """The .pt format of before DCP, written exactly as the old Trainer.save did, resumes bitwise."""
    from vlforge.engine import Trainer, rng_state
    from vlforge.recipe import load_recipe

    assert main(["run", str(tiny_recipe), *test_plugin]) == 0
    (reference,) = run_ids(runs_root)
    interrupt = [*test_plugin, "objectives.contrastive.interrupt_after_step=2"]
    assert main(["run", str(tiny_recipe), *interrupt]) == 130
    (run_id,) = set(run_ids(runs_root)) - {reference}
    run_dir = next(runs_root.glob(f"*/{run_id}"))

    recipe, plugins = load_recipe(str(run_dir / "recipe.toml"))
    trainer = Trainer(recipe, plugins, str(run_dir))
    (dcp_checkpoint,) = [url for _, url in ckpt.list_checkpoints(str(run_dir))]
    trainer.restore(dcp_checkpoint)
    train_state = torch.load(Path(dcp_checkpoint) / "train_state.pt", weights_only=False)
    old = {
        "version": 1,
        "run_id": run_id,
        "progress": vars(trainer.progress).copy(),
        "data": [trainer.stream.state_dict()],
        "model": trainer.model.state_dict(),
        "optimizer": trainer.state.optimizer.state_dict(),
        "scheduler": trainer.state.scheduler.state_dict(),
        "rng": train_state["rng"],  # the RNG as saved at step 2, not as building the trainer left it
        "world_size": 1,
        "plugins": {},
    }
    assert rng_state().keys() == old["rng"][0].keys()
    torch.save(old, run_dir / "checkpoints" / "step_00000002.pt")
    ckpt.layout.remove(dcp_checkpoint)
    assert main(["checkpoint", "inspect", str(run_dir), "--verify"]) == 0

    assert main(["run", str(tiny_recipe), *interrupt, "--resume"]) == 0
    assert losses(runs_root, run_id) == losses(runs_root, reference)

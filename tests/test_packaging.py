"""The built wheel works outside the checkout: package data, shipped recipes by name, a short run.

The wheel is installed (not editable) into a fresh venv whose dependencies come from this test
environment through a .pth file, so torch is not installed a second time. Everything then runs
from a temporary folder with no PYTHONPATH, so nothing can come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One process for every recipe: importing torch once instead of 26 times.
CHECK_EVERY_RECIPE = """
import sys
from vlforge.cli import main
from vlforge.resources import shipped_recipes
assert "site-packages" in __import__("vlforge").__file__, __import__("vlforge").__file__
failed = [name for name in shipped_recipes() for command in ("validate", "run")
          if main([command, name] + (["--dry-run"] if command == "run" else [])) != 0]
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path, Path]:
    """(venv bin folder, environment, a working folder outside the checkout, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info", "build", "dist", ".*cache"
    )
    shutil.copytree(REPO, source, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        tmp,
        dict(os.environ),
    )
    (wheel,) = (tmp / "dist").glob("vlforge-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        # --ignore-installed: the test environment (seen through the .pth) has vlforge too
        [
            *pip,
            "--python",
            str(venv / "bin/python"),
            "install",
            "--no-deps",
            "--ignore-installed",
            str(wheel),
        ],
        tmp,
        dict(os.environ),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "OMP_NUM_THREADS": "1",
        "VLFORGE_RUNS": str(tmp / "runs"),
        "PATH": f"{venv / 'bin'}:{env['PATH']}",
    }
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", env, work, wheel


def test_wheel_ships_recipes_profiles_and_tokenizers(installed):
    *_, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlforge/recipes/flip_vith_laion2b.toml" in names
    assert "vlforge/profiles/a100.toml" in names
    assert "vlforge/tokenizers/bert-base-uncased/vocab.txt" in names
    assert not any(name.startswith(("tests/", "recipes/", "slurm/")) for name in names)


@pytest.mark.slow
def test_installed_wheel_runs_shipped_recipes_by_name(installed):
    bin_dir, env, work, _ = installed
    assert run([str(bin_dir / "vlforge"), "--version"], work, env).strip() == f"vlforge {_version()}"
    listing = run([str(bin_dir / "vlforge"), "recipes"], work, env)
    assert "flip_vith_laion2b" in listing and "quickstart" in listing
    run([str(bin_dir / "vlforge"), "recipes", "cp", "albef_14m", "mine/"], work, env)
    assert (work / "mine/albef_14m.toml").is_file() and (
        work / "mine/albef_4m.toml"
    ).is_file()  # its base too
    run([str(bin_dir / "python"), "-c", CHECK_EVERY_RECIPE], work, env, timeout=600)
    quick = [
        "train.steps=3",
        "train.batch_size=16",
        "data.train_size=64",
        "data.val_size=32",
        "train.progress=false",
    ]
    out = run([str(bin_dir / "vlforge"), "run", "quickstart", *quick], work, env)
    assert "completed" in out and "i2t_r1" in out
    run([str(bin_dir / "vlforge"), "validate", "mine/albef_14m.toml"], work, env)


def _version() -> str:
    import vlforge

    return vlforge.__version__

"""The command line: exit codes, messages without tracebacks, lazy imports, dry runs."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from vlforge.cli import main

from .conftest import REPO


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlforge.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_bad_recipe_exits_2_with_every_problem_and_no_traceback(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("lr = 1e-3", "lr = 1e-3\nlr_sceduler = 1"))
    result = run_cli("validate", str(tiny_recipe), "train.stepz=1", 'data.type="synthetic.shapez"')
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"recipe {tiny_recipe}: 3 problems" in result.stderr  # static and component ones together
    assert "optim.lr_sceduler: unknown key" in result.stderr and f"[{tiny_recipe}]" in result.stderr
    assert "train.stepz: unknown key; did you mean 'steps'?" in result.stderr
    assert "[command line]" in result.stderr
    assert "data.type: unknown dataset 'synthetic.shapez'; did you mean 'synthetic.shapes'?" in result.stderr


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_help_and_show_do_not_import_torch_and_validate_only_what_its_checks_need(tiny_recipe):
    probe = (
        "import sys; from vlforge.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'timm', 'transformers', 'duckdb') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(code)"
    )
    for command, heavy in [("show", "[]"), ("validate", "['torch', 'timm']")]:  # timm: the model-name check
        result = subprocess.run(
            [sys.executable, "-c", probe, command, str(tiny_recipe)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"HEAVY {heavy}" in result.stdout
    result = subprocess.run(
        [sys.executable, "-c", probe.replace("main(sys.argv[1:])", "0"), "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "HEAVY []" in result.stdout
    assert run_cli("--help").returncode == 0


def test_show_prints_resolved_recipe_with_defaults(tiny_recipe, capsys):
    assert main(["show", str(tiny_recipe), "optim.lr=0.01"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 0.01
    assert resolved["optim"]["weight_decay"] == 0.05  # a default, now explicit
    assert resolved["evaluators"]["retrieval"]["split"] == "val"  # a component default


def test_plugins_lists_components_with_fields(capsys):
    assert main(["plugins", "--kind", "objective"]) == 0
    out = capsys.readouterr().out
    assert "objective  clip.infonce" in out and "init_temperature" in out
    assert "dataset" not in out.split("\n")[0]
    assert main(["plugins", "--kind", "objectiv"]) == 2
    assert "did you mean 'objective'" in capsys.readouterr().err


def test_dry_run_builds_on_meta_and_prints_plan(tiny_recipe, capsys, runs_root):
    assert main(["run", str(tiny_recipe), "--dry-run", "launch.nproc=2"]) == 0
    out = capsys.readouterr().out
    assert "world size 2" in out
    assert "global batch 16 = 2 ranks × 1 accumulation × 8 per rank" in out
    assert "vision" in out and "M parameters" in out
    assert not runs_root.exists()  # nothing was run or written


def test_query_refuses_writes(runs_root, capsys):
    from vlforge.results.index import build_index

    runs_root.mkdir()
    build_index(str(runs_root))
    assert main(["query", "CREATE TABLE x AS SELECT 1"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(("vlforge_plugins", *p.parent.relative_to(REPO / "plugins").parts)).rstrip(".")
        for p in (REPO / "plugins").rglob("__init__.py")
    } | {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vlforge").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    assert main(["validate", str(recipe)]) == 0

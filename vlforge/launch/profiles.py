"""Cluster profiles: what a Slurm cluster needs to hear, in one TOML file per cluster.

A recipe names a profile (``launch.profile = "a100"``) and asks for nodes; the profile
says where and how: partition, account, GPUs per node, CPUs and memory per task (one task
per GPU), time limit, how long before the limit the job is signalled, setup lines and
extra sbatch/srun options. Profiles are read like recipes (``extends`` works, unknown keys
are refused with the valid ones listed) and every problem is reported at once.

A profile name is looked up in ``$VLFORGE_SLURM_PROFILES`` (folders separated by ``:``),
then ``./slurm/profiles`` and the shipped profiles (this checkout's ``slurm/profiles``); a value ending in
``.toml`` is a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from vlforge.errors import VlforgeError
from vlforge.recipe import Problem, RecipeError, _problems_from, read_toml
from vlforge.registry import did_you_mean
from vlforge.resources import shipped_folder

PROFILES_ENV = "VLFORGE_SLURM_PROFILES"
_REPO_PROFILES = shipped_folder("profiles")  # slurm/profiles in a checkout, vlforge/profiles in a wheel
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


class ProfileError(VlforgeError):
    """A profile, or the launch plan built from it, has problems; carries every one found."""

    def __init__(self, what: str, problems: list[Problem]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{what}: {count}\n{lines}")


def slurm_minutes(value: str | int) -> int:
    """A Slurm time limit in whole minutes (seconds round up): 90, "1:30:00", "2-00:00:00"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"time limit must be positive, got {value}")
        return value
    match = _TIME.match(str(value).strip())
    if not match:
        raise ValueError(f"'{value}' is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days = int(match["days"] or 0)
    fields = [int(x) for x in (match["a"], match["b"], match["c"]) if x is not None]
    if match["days"] is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:  # HH:MM:SS
        hours, minutes, seconds = fields
    else:  # minutes[:seconds]
        hours, (minutes, seconds) = 0, (fields + [0])[:2]
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"time limit must be positive, got '{value}'")
    return -(-total // 60)


class ClusterProfile(BaseModel):
    """One cluster's settings; every field maps to an sbatch/srun option (docs/slurm.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""  # defaults to the file's stem
    description: str = ""
    partition: str
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. "a100-80gb"
    gpus_per_node: int = Field(0, ge=0)  # 0: a CPU-only partition (gloo)
    # One task per GPU, so these are per GPU (per process on CPU-only profiles).
    cpus_per_task: int = Field(1, gt=0)
    mem_per_task_gb: float | None = Field(None, gt=0)
    time_limit: str | int = "1:00:00"
    # USR2 comes this long before the time limit: enough for a step and a checkpoint.
    signal_delay_s: int = Field(120, gt=0)
    setup: list[str] = Field(default_factory=list)  # shell lines before srun (module load, ...)
    sbatch: dict[str, str | int | bool] = Field(default_factory=dict)  # extra #SBATCH options
    srun_args: list[str] = Field(default_factory=list)
    python: str | None = None  # interpreter on the nodes; default: the submitting one
    log_dir: str | None = None  # shared folder for Slurm logs; default <runs root>/.slurm/logs
    # The hardware `--dry-run` plans against (docs/plan.md): memory per GPU, its dense bf16 peak
    # (A100: 312 TFLOP/s) and the model FLOPs utilisation a step is assumed to reach.
    gpu_memory_gb: float | None = Field(None, gt=0)
    gpu_peak_tflops: float | None = Field(None, gt=0)
    mfu: float = Field(0.4, gt=0, le=1)
    _path: str = PrivateAttr("")

    @field_validator("time_limit")
    @classmethod
    def _slurm_time(cls, value: str | int) -> str | int:
        slurm_minutes(value)
        return value

    @property
    def time_min(self) -> int:
        return slurm_minutes(self.time_limit)

    @property
    def path(self) -> str:
        """The file this profile was read from."""
        return self._path


def profile_dirs() -> list[Path]:
    """Folders searched for ``<name>.toml``, first match wins."""
    extra = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "slurm" / "profiles", _REPO_PROFILES]


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})


def find_profile(ref: str, relative_to: Path | None = None) -> Path | None:
    """The file a profile reference names (a path ending in .toml, or a name); None if absent."""
    if ref.endswith(".toml"):
        candidates = [Path(ref)] if Path(ref).is_absolute() else [Path.cwd() / ref]
        if relative_to is not None and not Path(ref).is_absolute():
            candidates.insert(0, relative_to / ref)
    else:
        candidates = [d / f"{ref}.toml" for d in profile_dirs()]
    return next((c for c in candidates if c.is_file()), None)


def unknown_profile(ref: str) -> str:
    """The message for a profile reference that names no file."""
    if ref.endswith(".toml"):
        return f"profile file '{ref}' not found"
    names = available_profiles()
    folders = ", ".join(str(d) for d in profile_dirs())
    return f"unknown profile '{ref}'{did_you_mean(ref, names)} (profiles: {', '.join(names)}; from {folders})"


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and validate one profile file (``extends`` allowed); raises ProfileError."""
    try:
        raw = read_toml(path)
    except RecipeError as exc:
        raise ProfileError(f"profile {path}", exc.problems) from None
    data: dict[str, Any] = dict(raw.data)
    data.setdefault("name", Path(raw.path).stem)
    try:
        profile = ClusterProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {path}", _problems_from(exc, ClusterProfile, raw)) from None
    profile._path = str(path)
    return profile

"""Recipes: TOML files validated by pydantic, the single source of truth of a run.

A recipe is read in four steps, and every problem found along the way is
reported at once, each naming the dotted key, the file it came from and, for
unknown names, the valid choices:

1. TOML + ``extends = "base.toml"`` (deep merge; paths relative to the
   extending file; chains allowed, cycles refused). Each key remembers the
   file (or "command line") that set it.
2. ``a.b.c=value`` overrides, values parsed as TOML (``lr=3e-4``,
   ``name="x"``, ``betas=[0.9, 0.95]``); a bare word is taken as a string.
3. The static sections below (``extra="forbid"`` everywhere; numbers must be
   finite: ``nan``/``inf`` are refused).
4. Every component table (``type = "<name>"`` + options) against the config
   model its plugin registered, even when step 3 found problems: one report
   holds both.
5. With ``check_resources`` (``vlforge validate`` and ``vlforge run``): what
   each component config points at (files, model names), through the
   ``check_resources()`` method a config may define (``vlforge.registry.
   ResourceChecked``), so a run never fails on them after it started.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from vlforge.errors import VlforgeError
from vlforge.paths import RecipePath
from vlforge.registry import Registry, RegistryError, did_you_mean

COMMAND_LINE = "command line"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    key: str  # dotted path, "" for the whole recipe
    message: str
    source: str  # file that set the key, or "command line"

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        return f"{where}{self.message} [{self.source}]"


class RecipeError(VlforgeError):
    """A recipe could not be read; carries every problem found."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {path}: {count}\n{lines}")


# --------------------------------------------------------------------------- sections


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ComponentTable(BaseModel):
    """``type = "<registered name>"`` plus the component's own options."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str
    _config: BaseModel | None = PrivateAttr(default=None)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def config(self) -> BaseModel:
        """The options validated against the component's registered config model."""
        if self._config is None:
            raise RuntimeError(f"component '{self.type}' was not validated against the registry")
        return self._config


class ObjectiveTable(ComponentTable):
    weight: float = 1.0  # the engine multiplies every term of this objective by it


class EvaluatorTable(ComponentTable):
    # The evaluator's own dataset table (any registered dataset type); default: the run's [data].
    data: ComponentTable | None = None


class ModelSection(Section):
    vision: ComponentTable | None = None
    text: ComponentTable | None = None
    adapter: ComponentTable | None = None
    fusion: ComponentTable | None = None
    # A checkpoint file or a run directory (its latest checkpoint): a fresh run starts from
    # those model weights (fine-tuning, FLIP's unmasked tuning); optimizer, schedule and data
    # start anew. A resumed run restores its own checkpoint instead. Also an open_clip
    # checkpoint or a Hugging Face CLIP folder (vlforge.weights, docs/weights.md).
    init_from: RecipePath | None = None


class LockSection(Section):
    """``[optim.lock.<part>]``: the part is frozen except its last ``unlocked_blocks`` blocks and head."""

    unlocked_blocks: int = Field(0, ge=0)


class OptimSection(Section):
    lr: float = 1e-3
    # "per256": the absolute lr is lr * global_batch / 256 (FLIP's convention).
    lr_scaling: Literal["none", "per256"] = "none"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    # Parameters with fewer than 2 dims, or whose name contains one of these, get no decay.
    no_decay: list[str] = Field(default_factory=lambda: ["bias", "norm", "cls_token", "pos_embed"])
    # Fine-tuning (vlforge/optim.py, docs/weights.md): freeze parts, scale their lr, decay it by layer.
    lock: dict[str, LockSection] = Field(default_factory=dict)  # part -> what stays trainable
    lr_multipliers: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # name prefix -> m
    layer_decay: dict[str, Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=dict)  # part -> d


class ScheduleSection(Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # final lr as a fraction of the peak


class DDPSection(Section):
    """DistributedDataParallel options (``train.parallel = "ddp"``)."""

    gradient_as_bucket_view: bool = True  # gradients are views into the all-reduce buckets: one copy less
    static_graph: bool = False  # the same parameters take part in every step: more overlap
    grad_compression: Literal["none", "bf16"] = "none"  # all-reduce gradients in bf16: half the bytes
    # Broadcast buffers from rank 0 before every forward. Off by default: vlforge's buffers are
    # constant or updated identically on every rank (ALBEF's queues take gathered features).
    broadcast_buffers: bool = False


class TrainSection(Section):
    steps: int = Field(..., gt=0)  # optimizer steps
    batch_size: int = Field(..., gt=0)  # global: all ranks and all accumulation micro-batches
    accum_steps: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_clip: float | None = 1.0  # global norm, once per optimizer step
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, gt=0)
    num_workers: int = Field(0, ge=0)
    progress: bool = True
    # How ranks hold the model: "ddp" replicates it; "fsdp" shards parameters, gradients and
    # optimizer state with FSDP2 (fully_shard) over each component's shard units.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    frozen_dtype: Literal["fp32", "bf16"] = "fp32"  # storage dtype of frozen parameters
    compile: bool = False  # torch.compile each shard unit (a block)
    ddp: DDPSection = Field(default_factory=DDPSection)
    # Checkpoints: written while training goes on (at most one save in flight); frozen
    # parameters that come from a pretrained source are reloaded from it unless included.
    async_checkpoint: bool = False
    checkpoint_frozen: bool = False


class LaunchSection(Section):
    launcher: Literal["local", "slurm"] = "local"
    # Processes per node. Unset: 1 locally; on Slurm one per GPU of the profile's nodes
    # (1 on CPU-only profiles).
    nproc: int | None = Field(None, gt=0)
    nodes: int = Field(1, gt=0)
    # Slurm only (docs/slurm.md): a cluster profile (name under slurm/profiles/, or a path; with any
    # launcher also the GPU memory and peak FLOP/s the --dry-run plan compares with, docs/plan.md),
    # a time limit overriding the profile's ("HH:MM:SS", "D-HH:MM:SS" or minutes), and how
    # often a preempted, timed-out or crashed run may requeue itself (then it stays `preempted`,
    # or, after a crash, ends `failed`).
    profile: str | None = None
    time_limit: str | int | None = None
    max_requeues: int = Field(3, ge=0)
    collective_timeout_s: int = Field(1800, gt=0)  # a collective that waits longer fails the run

    @property
    def processes_per_node(self) -> int:
        """``nproc``, or 1 where no launcher decided otherwise."""
        return self.nproc or 1


class SweepSection(Section):
    """Runs that `vlforge sweep` submits as one Slurm job array (docs/slurm.md).

    ``grid``: recipe key -> list of values, one run per combination. ``points``: one table of
    recipe keys per run. In each run's own recipe, vlforge replaces the definition with the
    run's ``index`` in the array and its ``overrides``, so the index records what varied.
    """

    grid: dict[str, Any] | None = None
    points: list[dict[str, Any]] | None = None
    index: int | None = None
    overrides: dict[str, Any] | None = None


class Recipe(Section):
    name: str = ""  # defaults to the file's stem
    experiment: str = "default"
    description: str = ""
    seed: int = 0
    plugins: list[str] = Field(default_factory=list)
    model: ModelSection = Field(default_factory=ModelSection)
    masking: ComponentTable | None = None
    teacher: ComponentTable | None = None
    objectives: dict[str, ObjectiveTable] = Field(default_factory=dict)
    data: ComponentTable
    evaluators: dict[str, EvaluatorTable] = Field(default_factory=dict)
    # Trackers the run also reports to (``[sinks.<name>] type = "tensorboard"|"wandb"|"mlflow"``);
    # the run directory and its index stay the record (docs/watching.md).
    sinks: dict[str, ComponentTable] = Field(default_factory=dict)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection
    launch: LaunchSection = Field(default_factory=LaunchSection)
    sweep: SweepSection | None = None

    def component_tables(self) -> list[tuple[str, str, ComponentTable]]:
        """(dotted key, kind, table) for every component the recipe names."""
        tables = [
            (key, kind, value_at(self, key))
            for key, kind in component_slots({group: getattr(self, group) for group in NAMED_GROUPS})
        ]
        return [(key, kind, table) for key, kind, table in tables if table is not None]

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data with every default filled in, components included."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key, _, table in self.component_tables():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            extra = {"weight": table.weight} if isinstance(table, ObjectiveTable) else {}
            if isinstance(table, EvaluatorTable) and table.data is not None:
                extra = {"data": {}}  # filled in as its own component table, listed next
            node[leaf] = {
                "type": table.type,
                **extra,
                **table.config.model_dump(mode="json", exclude_none=True),
            }
        return data

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.resolved())


# Where component tables sit in a recipe, and their kinds; objectives and evaluators are named tables.
COMPONENT_SLOTS = (
    ("model.vision", "vision_encoder"),
    ("model.text", "text_encoder"),
    ("model.adapter", "adapter"),
    ("model.fusion", "fusion"),
    ("masking", "masking"),
    ("teacher", "teacher"),
    ("data", "dataset"),
)


# Sections that hold named component tables ([objectives.<name>], ...) and their kind.
NAMED_GROUPS = {"objectives": "objective", "evaluators": "evaluator", "sinks": "sink"}


# Kinds whose tables declare keys of their own (beside ``type``); the rest are plain ComponentTables.
TABLE_MODELS: dict[str, type[ComponentTable]] = {"objective": ObjectiveTable, "evaluator": EvaluatorTable}


def component_slots(names: dict[str, Iterable[str]]) -> list[tuple[str, str]]:
    """(dotted key, kind) of every place a component table may be, given each group's table names.

    An evaluator may name its own dataset table (``evaluators.<name>.data``).
    """
    named = [(f"{group}.{name}", NAMED_GROUPS[group]) for group in NAMED_GROUPS for name in names[group]]
    own_data = [(f"evaluators.{name}.data", "dataset") for name in names["evaluators"]]
    return [*COMPONENT_SLOTS, *named, *own_data]


def value_at(node: Any, key: str) -> Any:
    """The value at a dotted key of nested models or dicts; None where absent."""
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


# --------------------------------------------------------------------------- reading


@dataclass
class RawRecipe:
    """Merged TOML data plus, for every dotted key, the file that set it."""

    data: dict[str, Any]
    sources: dict[str, str]
    path: str

    def source_of(self, key: str) -> str:
        """The file that set ``key`` or its nearest set ancestor."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            found = self.sources.get(".".join(parts[:end]))
            if found:
                return found
        return self.path


def _leaf_sources(data: dict[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_leaf_sources(value, source, dotted + "."))
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_text(location: str) -> str | None:
    """A local path's or fsspec URL's text (a run directory's recipe may be remote); None if absent."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return _decode_recipe(fs.cat_file(path), location) if fs.isfile(path) else None


def _decode_recipe(data: bytes, location: str) -> str:
    """A recipe file's text; TOML is UTF-8, so anything else names the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = (
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at position {exc.start} "
            f"(line {line}, column {column}); save the file as UTF-8"
        )
        raise RecipeError(location, [Problem("", message, location)]) from None


def _sibling(location: str, name: str) -> str:
    """``name`` relative to the folder holding ``location`` (path or URL)."""
    return (
        str(Path(location).parent / name) if "://" not in location else f"{location.rsplit('/', 1)[0]}/{name}"
    )


def read_toml(path: str | Path, _chain: tuple[str, ...] = ()) -> RawRecipe:
    """Read a recipe file (path or fsspec URL) and everything it ``extends``."""
    shown = str(path)
    identity = shown if "://" in shown else str(Path(shown).resolve())
    if identity in _chain:
        cycle = " -> ".join((*_chain, identity))
        raise RecipeError(shown, [Problem("extends", f"circular extends: {cycle}", shown)])
    text = _read_text(shown)
    if text is None:
        raise RecipeError(shown, [Problem("", "file not found", shown)])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(shown, [Problem("", f"invalid TOML: {exc}", shown)]) from None
    base_name = data.pop("extends", None)
    deletions = _pop_deletions(data, shown, extends=base_name is not None)
    replaced = _pop_replace_markers(data, shown)
    own = RawRecipe(data, _leaf_sources(data, shown), shown)
    if base_name is None:
        return own
    if not isinstance(base_name, str):
        raise RecipeError(shown, [Problem("extends", "must be a path string", shown)])
    base_path = _sibling(shown, base_name)
    if _read_text(base_path) is None:
        raise RecipeError(shown, [Problem("extends", f"base recipe '{base_path}' not found", shown)])
    base = read_toml(base_path, (*_chain, identity))
    return inherit(base, own, deletions, replaced)


# --------------------------------------------------------------------------- deleting and replacing
# An extending recipe lists inherited keys to drop in ``delete = ["data.urls"]`` and marks a table
# that replaces the inherited one (instead of merging into it) with ``__replace__ = true``; on the
# command line ``~data.urls`` deletes and ``data={type="captions", ...}`` replaces (docs/recipes.md).

DELETE_KEY = "delete"
REPLACE_MARKER = "__replace__"


def _pop_deletions(data: dict[str, Any], shown: str, extends: bool) -> list[str]:
    """The ``delete = [...]`` list of a recipe file, checked and removed from ``data``."""
    if DELETE_KEY not in data:
        return []
    deletions = data.pop(DELETE_KEY)
    if isinstance(deletions, str):
        deletions = [deletions]
    if not isinstance(deletions, list) or not all(isinstance(k, str) and k for k in deletions):
        message = 'must be a list of dotted inherited keys, e.g. ["data.urls"]'
        raise RecipeError(shown, [Problem(DELETE_KEY, message, shown)])
    if not extends:
        message = "deletes inherited keys, but this recipe extends nothing"
        raise RecipeError(shown, [Problem(DELETE_KEY, message, shown)])
    return deletions


def _pop_replace_markers(data: dict[str, Any], shown: str, prefix: str = "") -> list[str]:
    """Dotted keys of the tables marked ``__replace__ = true``; the markers are removed."""
    replaced = []
    if REPLACE_MARKER in data:
        marker = data.pop(REPLACE_MARKER)
        if marker is not True:
            key = f"{prefix}{REPLACE_MARKER}"
            raise RecipeError(shown, [Problem(key, f"must be true (got {marker!r})", shown)])
        replaced.append(prefix.rstrip("."))
    for key, value in data.items():
        if isinstance(value, dict):
            replaced += _pop_replace_markers(value, shown, f"{prefix}{key}.")
    return replaced


def delete_key(raw: RawRecipe, key: str) -> bool:
    """Remove ``key`` (dotted) and the sources of everything under it; False if it is not set."""
    *parents, leaf = key.split(".")
    node: Any = raw.data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return False
    del node[leaf]
    for dotted in [k for k in raw.sources if k == key or k.startswith(f"{key}.")]:
        del raw.sources[dotted]
    return True


def inherit(base: RawRecipe, own: RawRecipe, deletions: list[str], replaced: list[str]) -> RawRecipe:
    """``own`` over ``base``: listed keys deleted, marked tables replaced, the rest deep-merged."""
    missing = [key for key in deletions if not delete_key(base, key)]
    if missing:
        inherited = ", ".join(sorted(k for k in base.sources if "." not in k))
        raise RecipeError(
            own.path,
            [
                Problem(
                    DELETE_KEY,
                    f"'{key}' is not set by the base recipe (its top-level keys: {inherited})",
                    own.path,
                )
                for key in missing
            ],
        )
    for key in replaced:
        delete_key(base, key)
    return RawRecipe(deep_merge(base.data, own.data), {**base.sources, **own.sources}, own.path)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", TOML-typed value; a bare word is a string)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override '{text}' is not of the form key.path=value")
    try:
        return key, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value.strip()


def apply_overrides(raw: RawRecipe, overrides: list[str]) -> None:
    problems = []
    for text in overrides:
        if text.startswith("~"):  # ~a.b: delete an inherited key
            if not delete_key(raw, text[1:]):
                problems.append(Problem(text[1:], "cannot delete: no recipe sets this key", COMMAND_LINE))
            continue
        try:
            key, value = parse_override(text)
        except ValueError as exc:
            problems.append(Problem("", str(exc), COMMAND_LINE))
            continue
        *parents, leaf = key.split(".")
        node = raw.data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(Problem(key, f"'{part}' is a value, not a table", COMMAND_LINE))
                break
            node = child
        else:
            delete_key(raw, key)  # a table given on the command line replaces the inherited one
            node[leaf] = value
            parent = ".".join(parents)
            raw.sources.update(_leaf_sources({leaf: value}, COMMAND_LINE, f"{parent}." if parent else ""))
    if problems:
        raise RecipeError(raw.path, problems)


# --------------------------------------------------------------------------- validating


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of ``loc`` (for listing valid keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            annotation = current.model_fields[part].annotation
            current = _unwrap_model(annotation)
        elif isinstance(current, type) and issubclass(current, ComponentTable):
            continue  # the key of a dict of tables (objectives.<name>)
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """ModelSection | None -> ModelSection; dict[str, ObjectiveTable] -> ObjectiveTable."""
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _problems_from(
    exc: ValidationError, model: type[BaseModel], raw: RawRecipe, prefix: str = ""
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = (prefix + ".".join(str(p) for p in loc)).rstrip(".")  # a table-wide error: the table's key
        if error["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            valid = _field_names(owner) if owner else []
            hint = did_you_mean(str(loc[-1]), valid)
            listing = f" (valid keys: {', '.join(valid)})" if valid else ""
            message = f"unknown key{hint}{listing}"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"{error['msg']} (got {error.get('input')!r})"
        problems.append(Problem(key, message, raw.source_of(key)))
    return problems


def validate_components(raw: RawRecipe, registry: Registry) -> tuple[dict[str, BaseModel], list[Problem]]:
    """Validate each component table of the raw recipe against its registered config.

    Works on the raw data, so it runs whether or not the static sections passed (one
    report for both). Tables without a string ``type`` are left to the static pass.
    Returns the validated configs by dotted key, and the problems.
    """
    configs: dict[str, BaseModel] = {}
    problems = []
    for key, kind, table in _raw_component_tables(raw.data):
        try:
            component = registry.get(kind, table["type"])
        except RegistryError as exc:
            problems.append(Problem(f"{key}.type", str(exc), raw.source_of(f"{key}.type")))
            continue
        declared = TABLE_MODELS.get(kind, ComponentTable).model_fields  # not the component's options
        options = {name: value for name, value in table.items() if name not in declared}
        try:
            configs[key] = component.config.model_validate(options)
        except ValidationError as exc:
            problems += _problems_from(exc, component.config, raw, prefix=f"{key}.")
    return configs, problems


def _raw_component_tables(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    def names(group: str) -> list[str]:
        tables = data.get(group)
        return list(tables) if isinstance(tables, dict) else []

    slots = component_slots({group: names(group) for group in NAMED_GROUPS})
    found = [(key, kind, value_at(data, key)) for key, kind in slots]
    return [
        (key, kind, table)
        for key, kind, table in found
        if isinstance(table, dict) and isinstance(table.get("type"), str)
    ]


def check_component_resources(configs: dict[str, BaseModel], raw: RawRecipe) -> list[Problem]:
    """Run every validated config's ``check_resources()`` (see ``vlforge.registry.ResourceChecked``)."""
    problems = []
    for key, config in configs.items():
        check = getattr(config, "check_resources", None)
        for issue in check() if check is not None else ():
            dotted = f"{key}.{issue.key}" if issue.key else key
            problems.append(Problem(dotted, issue.message, raw.source_of(dotted)))
    return problems


def parse_recipe(raw: RawRecipe) -> Recipe:
    """Validate the static sections (step 3); raises RecipeError with all problems."""
    data = dict(raw.data)
    data.setdefault("name", Path(raw.path).stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(raw.path, _problems_from(exc, Recipe, raw)) from None


def _load_plugins_of(raw: RawRecipe, extra_plugins: tuple[str, ...]) -> tuple[Any, list[Problem]]:
    """The plugin manager for the recipe's ``plugins`` (a malformed list: only the extra ones)."""
    from vlforge.plugins import PluginError, load_plugins

    named = raw.data.get("plugins", [])
    if not (isinstance(named, list) and all(isinstance(name, str) for name in named)):
        named = []  # the static pass reports the list itself
    try:
        return load_plugins([*named, *extra_plugins]), []
    except (PluginError, RegistryError) as exc:
        return None, [Problem("plugins", str(exc), raw.source_of("plugins"))]


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    extra_plugins: tuple[str, ...] = (),
    *,
    check_resources: bool = False,
):
    """Read, override and fully validate a recipe; returns (Recipe, Plugins).

    Loads the plugins the recipe names (plus ``extra_plugins``) to validate its
    component tables, and hands the plugin manager back for building the run.
    ``check_resources`` also checks what the components point at (step 5).
    Every problem of every step is raised together, in one ``RecipeError``.
    """
    from vlforge.resources import find_recipe

    raw = read_toml(find_recipe(str(path)))
    apply_overrides(raw, list(overrides))
    recipe: Recipe | None = None
    problems: list[Problem] = []
    try:
        recipe = parse_recipe(raw)
    except RecipeError as exc:
        problems += exc.problems
    plugins, plugin_problems = _load_plugins_of(raw, extra_plugins)
    problems += plugin_problems
    configs: dict[str, BaseModel] = {}
    if plugins is not None:
        configs, component_problems = validate_components(raw, plugins.registry)
        problems += component_problems
    resolve_recipe_paths(recipe, configs, raw)
    if check_resources:  # only configs that validated whole are checked
        problems += check_component_resources(configs, raw)
    if recipe is not None:
        for key, _, table in recipe.component_tables():
            table._config = configs.get(key)
        problems += check_consistency(recipe, raw)
        problems += check_evaluator_data(recipe, raw)
    if problems:
        raise RecipeError(raw.path, problems)
    return recipe, plugins


def resolve_recipe_paths(recipe: Recipe | None, configs: dict[str, BaseModel], raw: RawRecipe) -> None:
    """Every ``RecipePath`` value, static or in a component config, relative to the file that set it.

    ``configs`` are the validated component configs by dotted key; a recipe whose static
    sections did not validate (None) has only those resolved.
    """
    from vlforge.paths import resolve_model_paths

    def folder_of(key: str) -> str | None:
        source = raw.source_of(key)
        return None if source == COMMAND_LINE else _sibling(source, "").rstrip("/") or "."

    if recipe is not None:
        resolve_model_paths(recipe, "", folder_of)
    for key, config in configs.items():
        resolve_model_paths(config, f"{key}.", folder_of)


def check_consistency(recipe: Recipe, raw: RawRecipe) -> list[Problem]:
    """Cross-section rules that no single table can check."""
    problems = []
    if not recipe.objectives:
        problems.append(Problem("objectives", "at least one objective is required", raw.path))
    micro = recipe.train.accum_steps * recipe.launch.processes_per_node * recipe.launch.nodes
    if recipe.train.batch_size % micro:
        problems.append(
            Problem(
                "train.batch_size",
                f"global batch {recipe.train.batch_size} is not divisible by "
                f"accum_steps × processes = {micro}",
                raw.source_of("train.batch_size"),
            )
        )
    return problems


def check_evaluator_data(recipe: Recipe, raw: RawRecipe) -> list[Problem]:
    """What an evaluator would fail on after training: its data has no such split, no labels, no file.

    An evaluator config may define ``data_problems(data_config, data_type)`` returning (key, message)
    pairs; data configs say what they hold through ``held_out_splits()`` and ``label_names()``.
    """
    problems = []
    for name, table in recipe.evaluators.items():
        data, data_key = (table.data, f"evaluators.{name}.data") if table.data else (recipe.data, "data")
        if table._config is None or data._config is None:  # invalid tables are reported already
            continue
        check = getattr(table.config, "data_problems", None)
        if check is None:
            continue
        for key, message in check(data.config, data.type):
            dotted = f"{data_key}.type" if key == "data" else f"evaluators.{name}.{key}"
            problems.append(Problem(dotted, message, raw.source_of(dotted)))
    return problems


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> {"a.b.c": value}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat

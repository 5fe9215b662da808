"""The plan of a recipe before it runs: per-GPU memory, FLOPs, step time, wall clock and GPU-hours.

``vlforge run R --dry-run`` builds the model on the meta device and runs one training micro-batch
of every kind the data produces (forward and backward) on *fake* tensors (torch's FakeTensorMode:
shapes and dtypes, no storage, no arithmetic), at the planned per-GPU micro-batch, under the
recipe's autocast. From that pass it takes:

* **activations**: the bytes autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage, parameters and buffers
  excluded, autocast's bf16 weight copies included). Masking, text length, media count and the
  towers' ``gradient_checkpointing`` keys act as they do in training: a checkpointed block saves
  only its inputs; one call of each kind of checkpointed unit is replayed without it (what
  backward's recompute holds). When the recipe does not fit, the largest batch is run forward
  once more with checkpointing on everywhere (that lever's figure);
* **FLOPs**, forward per tower and backward in total (recompute included), with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention).

Static memory is counted from the parameters: trainable, frozen (``train.frozen_dtype``) and EMA
teacher parameters by dtype, gradients, AdamW's two moments and step counters, buffers, DDP's
bucket copy (none with ``gradient_as_bucket_view``) or, with ``train.parallel = "fsdp"``, a
1/world shard of all of it plus the all-gathered root and two shard units in the compute dtype.

FSDP's units are those the engine shards (``vlforge.parallel.shard_units``; parts without
``shard_units()`` go with the root). Estimated, not computed: the backward working set (2 × the
largest saved tensor) and the step time (FLOPs / (peak × MFU), both from the cluster profile,
MFU default ``DEFAULT_MFU``).
Autocast is CPU autocast's (CUDA's keeps LayerNorm and softmax outputs in fp32: a few % more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlforge.parallel import shard_units

if TYPE_CHECKING:
    from vlforge.launch.profiles import ClusterProfile
    from vlforge.model import VLModel
    from vlforge.plugins import Plugins
    from vlforge.recipe import Recipe

GB = 1e9  # memory in decimal GB, as GPUs are sold (A100 80 GB = 80e9 usable-ish bytes)
DEFAULT_MFU = 0.4  # model FLOPs utilisation assumed when a profile does not say
USABLE_FRACTION = 0.9  # of gpu_memory_gb: CUDA context, NCCL buffers and fragmentation take the rest
TOWERS = ("vision", "text", "adapter", "fusion", "teacher")


# --------------------------------------------------------------------------- saved-tensor accounting


class SavedTensorBytes:
    """Bytes autograd saves for backward while active (a context manager), per storage, once.

    Parameters and buffers of ``model`` are not activations and are not counted. A tensor saved
    inside a shard unit of ``units`` is also credited to that unit (the innermost one).
    Works on real, meta and fake tensors (storages are told apart by their C pointer).
    """

    def __init__(self, model: nn.Module, units: list[nn.Module] = ()) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        self.static = {t.untyped_storage()._cdata for t in tensors}
        self.saved: dict[int, tuple[int, torch.Tensor]] = {}  # storage -> (bytes, a tensor keeping it)
        self.per_unit: dict[int, int] = {}  # id(unit) -> bytes first saved inside it
        self._stack: list[int] = []
        self._units = list(units)
        self._calls: dict[tuple, tuple[nn.Module, tuple, dict]] = {}  # unit kind -> (unit, args, kwargs)
        self._handles: list[Any] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(nbytes for nbytes, _ in self.saved.values())

    @property
    def largest(self) -> int:
        return max((nbytes for nbytes, _ in self.saved.values()), default=0)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.static and key not in self.saved:
            nbytes = storage.nbytes()
            self.saved[key] = (nbytes, tensor)  # the reference keeps the C pointer from being reused
            if self._stack:
                self.per_unit[self._stack[-1]] = self.per_unit.get(self._stack[-1], 0) + nbytes
        return tensor

    def _enter_unit(self, unit: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append(id(unit))
        kind = (type(unit), sum(p.numel() for p in unit.parameters()))
        if torch.is_grad_enabled() and kind not in self._calls:  # one call of each kind of unit
            self._calls[kind] = (unit, args, kwargs)

    def recompute_bytes(self, model: nn.Module) -> int:
        """Bytes the largest *checkpointed* unit saves when backward recomputes it.

        A checkpointed unit saved no more than its inputs inside itself in this pass (a plain
        block saves several times its input); each kind of them is run once more, with its
        recorded inputs and its own checkpointing off, and counted.
        """
        largest = 0
        for unit, args, kwargs in self._calls.values():
            inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            if self.per_unit.get(id(unit), 0) > sum(t.untyped_storage().nbytes() for t in inputs):
                continue  # not checkpointed
            own = getattr(unit, "gradient_checkpointing", None)  # transformers layers check their own
            if own is not None:
                unit.gradient_checkpointing = False
            try:
                with SavedTensorBytes(model) as inside:
                    unit(*args, **kwargs)
            finally:
                if own is not None:
                    unit.gradient_checkpointing = own
            largest = max(largest, inside.total)
        return largest

    def _leave_unit(self, unit: nn.Module, args: Any, output: Any) -> None:
        self._stack.pop()

    def __enter__(self) -> SavedTensorBytes:
        for unit in self._units:
            self._handles.append(unit.register_forward_pre_hook(self._enter_unit, with_kwargs=True))
            self._handles.append(unit.register_forward_hook(self._leave_unit))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- the planned batches


def default_batches(model: VLModel, micro_batch: int) -> dict[str, dict[str, Any]]:
    """The core batch: images at the vision tower's input size, texts at the text tower's max length."""
    batch: dict[str, Any] = {}
    if model.vision is not None:
        batch["images"] = torch.zeros(micro_batch, *model.vision.data_config["input_size"])
    if model.text is not None:
        length = model.text.max_length
        batch["input_ids"] = torch.zeros(micro_batch, length, dtype=torch.long)
        batch["attention_mask"] = torch.ones(micro_batch, length, dtype=torch.long)
    return {"train": batch}


def planned_batches(model: VLModel, recipe: Recipe, micro_batch: int) -> dict[str, dict[str, Any]]:
    """``{kind: batch}``: from the first model part that says (``PlanBatchesLike``), else the core batch."""
    for module in model.modules():
        if module is not model and hasattr(module, "plan_batches"):
            return module.plan_batches(model, recipe, micro_batch)
    return default_batches(model, micro_batch)


def batch_samples(batch: dict[str, Any]) -> int:
    return next(value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor))


def per_step_counts(kinds: list[str], accum_steps: int) -> dict[str, int]:
    """Micro-batches of each kind in one optimizer step: the kinds in turn over the accumulation."""
    return {kind: accum_steps // len(kinds) + (i < accum_steps % len(kinds)) for i, kind in enumerate(kinds)}


# --------------------------------------------------------------------------- one pass on fake tensors


@dataclass
class PassProfile:
    """What one training micro-batch (forward + backward) saved and computed."""

    samples: int  # in the micro-batch
    activations: int  # bytes saved for backward
    largest: int  # the largest single saved storage
    recompute: int  # bytes the largest checkpointed unit saves again when backward recomputes it
    flops: dict[str, int]  # tower -> forward FLOPs; "backward": all of backward (recompute included)
    total_flops: int


@contextlib.contextmanager
def fake_model(model: nn.Module) -> Iterator[Any]:
    """``model``'s meta parameters and buffers as fake CPU tensors, for one FakeTensorMode block.

    Tied parameters stay tied. The model is for planning only afterwards (its tensors are fake).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.device("cpu"):
        fakes: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    if id(param) not in fakes:
                        fakes[id(param)] = nn.Parameter(
                            torch.empty_like(param, device="cpu"), param.requires_grad
                        )
                    module._parameters[name] = fakes[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = fakes.setdefault(
                        id(buffer), torch.empty_like(buffer, device="cpu")
                    )
        yield mode


def profile_pass(
    model: VLModel, batch: dict[str, Any], precision: str, units: list[nn.Module], backward: bool = True
) -> PassProfile:
    """Forward (and backward, counting FLOPs) of ``batch`` through ``model`` (fake tensors, training)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlforge.model import Progress

    model.train()
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    saved = SavedTensorBytes(model, units)
    counting = FlopCounterMode(display=False) if backward else contextlib.nullcontext()
    with counting as forward, saved, autocast:
        loss, _ = model(batch, Progress(total_steps=1))
    with autocast:
        recompute = saved.recompute_bytes(model)
    if not backward:
        return PassProfile(batch_samples(batch), saved.total, saved.largest, recompute, {}, 0)
    with FlopCounterMode(display=False) as backward_flops:
        loss.backward()  # recomputes checkpointed units
    counts = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()}
    root = type(model).__name__
    per_tower = {tower: counts.get(f"{root}.{tower}", 0) for tower in TOWERS if tower != "teacher"}
    per_tower["teacher"] = sum(
        v for k, v in counts.items() if k.count(".") == 3 and k.startswith(f"{root}.teacher.parts.")
    )
    per_tower["heads"] = forward.get_total_flops() - sum(per_tower.values())  # objectives' own layers
    # Backward runs outside the towers' module hooks (their inputs need no grad): one total.
    per_tower["backward"] = backward_flops.get_total_flops()
    total = forward.get_total_flops() + per_tower["backward"]
    return PassProfile(
        samples=batch_samples(batch),
        activations=saved.total,
        largest=saved.largest,
        recompute=recompute,
        flops={k: v for k, v in per_tower.items() if v},
        total_flops=total,
    )


# --------------------------------------------------------------------------- static memory


def parameter_bytes(model: VLModel, frozen_dtype: str) -> dict[str, int]:
    """Bytes of trainable, frozen and teacher parameters (each tensor once) and of buffers."""
    teacher = {id(p) for p in model.teacher.parameters()} if model.teacher is not None else set()
    totals = {"trainable": 0, "frozen": 0, "teacher": 0, "trainable_tensors": 0}
    for param in model.parameters():
        if id(param) in teacher:
            totals["teacher"] += param.numel() * param.element_size()
        elif param.requires_grad:
            totals["trainable"] += param.numel() * param.element_size()
            totals["trainable_tensors"] += 1
        else:
            # as vlforge.parallel.cast_frozen: only weight matrices (ndim >= 2) go to bf16;
            # 1-D norm weights and biases stay fp32
            cast = frozen_dtype == "bf16" and param.is_floating_point() and param.ndim >= 2
            totals["frozen"] += param.numel() * (2 if cast else param.element_size())
    totals["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    return totals


def optimizer_bytes(trainable: int, tensors: int) -> int:
    """AdamW's state: exp_avg and exp_avg_sq like each parameter, plus a float32 step per tensor."""
    return 2 * trainable + 4 * tensors


# --------------------------------------------------------------------------- the plan


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Lever:
    change: str  # recipe overrides or a description
    total_gb: float
    fits: bool


@dataclass
class Plan:
    recipe: str
    world_size: int
    micro_batch: int
    accum_steps: int
    parallel: str
    precision: str
    memory: list[Row]
    activations_by_kind: dict[str, int]
    gpu_memory_gb: float | None
    flops_per_sample: dict[str, dict[str, float]]  # batch kind -> tower -> FLOPs per sample
    step_flops: float  # per GPU, one optimizer step
    steps: int
    peak_tflops: float | None
    mfu: float
    measured: dict[str, float] = field(default_factory=dict)
    levers: list[Lever] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.memory)

    @property
    def usable_gb(self) -> float | None:
        return None if self.gpu_memory_gb is None else self.gpu_memory_gb * USABLE_FRACTION

    @property
    def fits(self) -> bool | None:
        return None if self.usable_gb is None else self.total_bytes / GB <= self.usable_gb

    @property
    def step_time_s(self) -> float | None:
        return None if not self.peak_tflops else self.step_flops / (self.peak_tflops * 1e12 * self.mfu)

    def to_dict(self) -> dict[str, Any]:
        step = self.step_time_s
        data = asdict(self)
        data["memory"] = {row.name: {"bytes": row.bytes, "note": row.note} for row in self.memory}
        data |= {
            "total_bytes": self.total_bytes,
            "total_gb": round(self.total_bytes / GB, 3),
            "usable_gb": self.usable_gb,
            "fits": self.fits,
            "estimate": {
                "step_time_s": step,
                "wall_clock_h": None if step is None else step * self.steps / 3600,
                "gpu_hours": None if step is None else step * self.steps / 3600 * self.world_size,
            },
        }
        return data


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:8.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:8.2f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    hours = seconds / 3600
    return (
        f"{hours * 60:.0f} min"
        if hours < 2
        else (f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days")
    )


def format_plan(plan: Plan) -> str:
    """The plan as a short table: memory rows, total against the GPU, then time and cost estimates."""
    lines = [
        f"memory per GPU ({plan.parallel}, world {plan.world_size}, micro-batch {plan.micro_batch} "
        f"× {plan.accum_steps} accumulation, {plan.precision})"
    ]
    for row in plan.memory:
        lines.append(f"  {row.name:<24}{_gb(row.bytes)}  {row.note}".rstrip())
    verdict = ""
    if plan.usable_gb is not None:
        state = "fits" if plan.fits else "DOES NOT FIT"
        verdict = f"  of {plan.gpu_memory_gb:g} GB ({plan.usable_gb:.1f} usable): {state}"
    lines.append(f"  {'total':<24}{_gb(plan.total_bytes)}{verdict}")
    if plan.fits is False:
        lines.append("levers that would make it fit (each alone, then together):")
        for lever in plan.levers:
            lines.append(f"  {lever.change:<58}{lever.total_gb:8.2f} GB  {'fits' if lever.fits else 'no'}")
    lines.append("compute (FLOPs per sample, counted on the model: forward by tower, then backward):")
    for kind, towers in plan.flops_per_sample.items():
        parts = ", ".join(f"{tower} {value / 1e9:,.1f} G" for tower, value in towers.items())
        lines.append(f"  {kind}: {parts}")
    step = plan.step_time_s
    if step is None:
        lines.append(
            f"  {plan.step_flops / 1e12:,.1f} TFLOP per GPU per step; no time estimate: the profile "
            "has no gpu_peak_tflops"
        )
    else:
        wall = step * plan.steps
        lines.append(
            f"estimate at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s: step {_duration(step)}, "
            f"{plan.steps:,} steps {_duration(wall)}, {wall / 3600 * plan.world_size:,.0f} GPU-hours"
        )
    if plan.measured:
        m = plan.measured
        lines.append(
            f"measured ({int(m['runs'])} run(s) of this recipe at world {plan.world_size}): "
            f"step {_duration(m['step_time_s'])}, {plan.steps:,} steps "
            f"{_duration(m['step_time_s'] * plan.steps)}, "
            f"{m['step_time_s'] * plan.steps / 3600 * plan.world_size:,.0f} GPU-hours"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- making the plan


def with_checkpointing(recipe: Recipe, on: bool) -> Recipe:
    """A copy of ``recipe`` with every component's ``gradient_checkpointing`` key set to ``on``."""
    copy = recipe.model_copy(deep=True)
    for _, _, table in copy.component_tables():
        config = table.config
        if "gradient_checkpointing" in type(config).model_fields:
            table._config = config.model_copy(update={"gradient_checkpointing": on})
    return copy


def checkpointing_keys(recipe: Recipe) -> list[tuple[str, bool]]:
    """(component key, gradient_checkpointing) of every component that has the key."""
    return [
        (key, table.config.gradient_checkpointing)
        for key, _, table in recipe.component_tables()
        if "gradient_checkpointing" in type(table.config).model_fields
    ]


def _build(recipe: Recipe, plugins: Plugins, world: int) -> VLModel:
    from vlforge.components import BuildContext
    from vlforge.model import build_model

    return build_model(recipe, plugins, BuildContext(recipe, world_size=world, device="meta", meta=True))


def profile_batches(
    model: VLModel,
    recipe: Recipe,
    micro_batch: int,
    precision: str,
    kinds: set[str] | None = None,
    backward: bool = True,
) -> dict[str, PassProfile]:
    """``{batch kind: PassProfile}``, one pass per kind (or per kind in ``kinds``).

    ``model`` is built on the meta device and becomes fake: it is good for planning only after.
    """
    units = shard_units(model)
    with fake_model(model):
        batches = planned_batches(model, recipe, micro_batch)
        return {
            kind: profile_pass(model, batch, precision, units, backward)
            for kind, batch in batches.items()
            if kinds is None or kind in kinds
        }


def plan_precision(recipe: Recipe, profile: ClusterProfile | None) -> str:
    """The autocast the run will use: "auto" is bf16 on GPUs (the profile's, else this machine's)."""
    if recipe.train.precision == "auto":
        on_gpu = bool(profile.gpus_per_node) if profile is not None else torch.cuda.is_available()
        return "bf16" if on_gpu else "fp32"
    return recipe.train.precision


def make_plan(
    recipe: Recipe,
    plugins: Plugins,
    model: VLModel,
    world: int,
    profile: ClusterProfile | None = None,
    measured: dict[str, float] | None = None,
) -> Plan:
    """The per-GPU memory plan and the time plan of ``recipe`` at ``world`` ranks (``model`` on meta)."""
    train = recipe.train
    micro = train.batch_size // (world * train.accum_steps)
    precision = plan_precision(recipe, profile)
    keys = [on for _, on in checkpointing_keys(recipe)]

    def checkpointed_forward(kind: str) -> PassProfile:
        """Batch kind ``kind`` again, with every tower's checkpointing on (forward suffices)."""
        variant = with_checkpointing(recipe, True)
        model = _build(variant, plugins, world)
        return profile_batches(model, variant, micro, precision, {kind}, backward=False)[kind]

    static = static_rows(model, recipe, world, precision)  # before the model's tensors become fake
    configured = profile_batches(model, recipe, micro, precision)
    # A checkpointed unit is recomputed in backward: its saved tensors exist again, one unit at a time.
    activations = Activations.of(configured)  # of the largest batch kind
    counts = per_step_counts(list(configured), train.accum_steps)
    plan = Plan(
        recipe=recipe.name,
        world_size=world,
        micro_batch=micro,
        accum_steps=train.accum_steps,
        parallel=train.parallel,
        precision=precision,
        memory=static + activations.rows(checkpointing_keys(recipe)),
        activations_by_kind={kind: p.activations for kind, p in configured.items()},
        gpu_memory_gb=profile.gpu_memory_gb if profile else None,
        flops_per_sample={
            kind: {tower: flops / p.samples for tower, flops in p.flops.items()}
            for kind, p in configured.items()
        },
        step_flops=sum(counts[kind] * p.total_flops for kind, p in configured.items()),
        steps=train.steps,
        peak_tflops=profile.gpu_peak_tflops if profile else None,
        mfu=profile.mfu if profile else DEFAULT_MFU,
        measured=measured or {},
    )
    if plan.fits is False:
        if all(keys):
            checkpointed = activations
        else:
            everywhere = checkpointed_forward(activations.kind)
            checkpointed = replace(activations, saved=everywhere.activations, recompute=everywhere.recompute)
        static_bytes = sum(row.bytes for row in static)
        plan.levers = find_levers(plan, recipe, model, static_bytes, activations, checkpointed)
    return plan


@dataclass
class Activations:
    """The per-micro-batch rows of the plan: saved activations, recompute, backward working set."""

    saved: int
    recompute: int
    largest: int
    kind: str

    @classmethod
    def of(cls, profiles: dict[str, PassProfile]) -> Activations:
        """The batch kind that needs the most."""
        total = {k: p.activations + p.recompute + 2 * p.largest for k, p in profiles.items()}
        p = profiles[kind := max(total, key=total.get)]
        return cls(p.activations, p.recompute, p.largest, kind)

    def scaled(self, factor: float) -> Activations:
        """At a micro-batch ``factor`` times as large (every activation grows with the batch)."""
        return replace(
            self,
            saved=int(self.saved * factor),
            recompute=int(self.recompute * factor),
            largest=int(self.largest * factor),
        )

    def rows(self, keys: list[tuple[str, bool]]) -> list[Row]:
        on = [key for key, value in keys if value]
        note = f"saved for backward, batch '{self.kind}'" + (f"; checkpointed: {', '.join(on)}" if on else "")
        rows = [Row("activations", self.saved, note)]
        if self.recompute:
            rows.append(Row("recompute (1 unit)", self.recompute, "a checkpointed unit again, in backward"))
        rows.append(Row("backward working set", 2 * self.largest, "estimate: 2 × largest saved tensor"))
        return rows

    @property
    def total(self) -> int:
        return self.saved + self.recompute + 2 * self.largest


def static_rows(model: VLModel, recipe: Recipe, world: int, precision: str) -> list[Row]:
    """Parameters, buffers, gradients, AdamW state and DDP/FSDP overhead per GPU."""
    train = recipe.train
    sizes = parameter_bytes(model, train.frozen_dtype)
    optimizer = optimizer_bytes(sizes["trainable"], sizes["trainable_tensors"])
    if train.parallel == "fsdp":
        return fsdp_rows(model, sizes, optimizer, world, precision)
    rows = [
        Row("parameters, trainable", sizes["trainable"], "fp32"),
        Row("parameters, frozen", sizes["frozen"], train.frozen_dtype),
        Row("parameters, EMA teacher", sizes["teacher"], "fp32"),
        Row("buffers", sizes["buffers"]),
        Row("gradients", sizes["trainable"], "fp32"),
        Row("AdamW state", optimizer, "exp_avg + exp_avg_sq + step"),
    ]
    if world > 1 and not train.ddp.gradient_as_bucket_view:
        rows.append(
            Row("DDP buckets", sizes["trainable"], "a gradient copy (gradient_as_bucket_view = false)")
        )
    return [row for row in rows if row.bytes]


def fsdp_rows(model: VLModel, sizes: dict[str, int], optimizer: int, world: int, precision: str) -> list[Row]:
    """FSDP2: everything sharded 1/world; the root and two units (current, prefetched) gathered."""
    compute = 2 if precision == "bf16" else 4  # MixedPrecisionPolicy(param_dtype=bf16) gathers bf16
    units = shard_units(model)
    unit_sizes = [sum(p.numel() for p in unit.parameters()) for unit in units]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    largest = max(unit_sizes, default=0)
    largest_trainable = max(
        (sum(p.numel() for p in unit.parameters() if p.requires_grad) for unit in units), default=0
    )
    shard = lambda nbytes: -(-nbytes // world)  # noqa: E731
    rows = [
        Row("parameters, trainable", shard(sizes["trainable"]), f"fp32, 1/{world} shard"),
        Row("parameters, frozen", shard(sizes["frozen"]), f"1/{world} shard"),
        Row("parameters, EMA teacher", shard(sizes["teacher"]), f"fp32, 1/{world} shard"),
        Row("buffers", sizes["buffers"]),
        Row("gradients", shard(sizes["trainable"]), f"fp32, 1/{world} shard"),
        Row("AdamW state", shard(optimizer), f"1/{world} shard"),
        Row(
            "FSDP gathered",
            compute * (root + 2 * largest) + 4 * largest_trainable,
            f"root + 2 units ({'bf16' if compute == 2 else 'fp32'}) + 1 unit's fp32 gradient",
        ),
    ]
    return [row for row in rows if row.bytes]


def find_levers(
    plan: Plan,
    recipe: Recipe,
    model: VLModel,
    static: int,
    activations: Activations,
    checkpointed: Activations,
) -> list[Lever]:
    """Each change that makes a recipe fit, alone and all together, with the total it would give
    (``static``: the recipe's static bytes as planned)."""
    world, train = plan.world_size, recipe.train
    usable = plan.usable_gb * GB

    def lever(change: str, static_bytes: int, acts: Activations) -> Lever:
        total = static_bytes + acts.total
        return Lever(change, round(total / GB, 2), total <= usable)

    def static_with(**updates: Any) -> int:
        changed = recipe.model_copy(update={"train": train.model_copy(update=updates)})
        return sum(row.bytes for row in static_rows(model, changed, world, plan.precision))

    found: list[Lever] = []
    together: dict[str, Any] = {}  # train.* updates of the combined lever
    combined_acts, names = activations, []
    if checkpointed.saved < activations.saved:
        found.append(lever("gradient_checkpointing = true on every tower", static, checkpointed))
        combined_acts, names = checkpointed, [*names, "checkpointing"]
    if train.parallel == "ddp" and world > 1:
        found.append(
            lever(f'train.parallel = "fsdp" ({world} shards)', static_with(parallel="fsdp"), activations)
        )
        together["parallel"], names = "fsdp", [*names, "fsdp"]
    if train.frozen_dtype == "fp32" and parameter_bytes(model, "fp32")["frozen"]:
        found.append(lever('train.frozen_dtype = "bf16"', static_with(frozen_dtype="bf16"), activations))
        together["frozen_dtype"], names = "bf16", [*names, "frozen bf16"]
    accum = smaller_micro_batch(plan, static, activations, usable)
    if accum is not None:
        micro = train.batch_size // (world * accum)
        smaller = activations.scaled(micro / plan.micro_batch)
        found.append(lever(f"train.accum_steps = {accum} (micro-batch {micro} per GPU)", static, smaller))
    if len(names) > 1:
        found.append(lever(" + ".join(names), static_with(**together), combined_acts))
    return found


def smaller_micro_batch(plan: Plan, static: int, activations: Activations, usable: float) -> int | None:
    """The fewest accumulation steps (same global batch) whose smaller micro-batch fits; None if none."""
    batch = plan.micro_batch * plan.world_size * plan.accum_steps
    for accum in range(plan.accum_steps + 1, batch // plan.world_size + 1):
        if batch % (plan.world_size * accum):
            continue
        micro = batch // (plan.world_size * accum)
        if static + activations.scaled(micro / plan.micro_batch).total <= usable:
            return accum
    return None


# --------------------------------------------------------------------------- measured figures


def measured_step_time(root: str, recipe: Recipe, world: int, profile: str | None) -> dict[str, float]:
    """``{"runs", "step_time_s"}`` from the run index: the median ``train/samples_per_s`` of runs
    of this recipe at this world size (and cluster profile); ``{}`` without an index or runs."""
    from vlforge.errors import VlforgeError
    from vlforge.results.queries import connect

    sql = (
        "SELECT count(DISTINCT m.run_id), median(m.value) FROM metrics m JOIN runs r USING (run_id) "
        "WHERE m.name = 'train/samples_per_s' AND r.recipe_name = ? AND r.world_size = ?"
    )
    params: list[Any] = [recipe.name, world]
    if profile:
        sql += " AND m.run_id IN (SELECT run_id FROM configs WHERE key = 'launch.profile' AND value = ?)"
        params.append(profile)
    try:
        con = connect(root, build=False)
    except (VlforgeError, OSError):
        return {}
    try:
        runs, samples_per_s = con.execute(sql, params).fetchone()
    finally:
        con.close()
    if not runs or not samples_per_s:
        return {}
    return {
        "runs": runs,
        "samples_per_s": samples_per_s,
        "step_time_s": recipe.train.batch_size / samples_per_s,
    }

"""The Slurm launcher: submit runs through submitit, and keep them alive across requeues.

Submitting (login node):

1. ``plan_launch`` resolves the recipe's cluster profile into a :class:`SlurmPlan` (nodes,
   one task per GPU, world size, time limit) and refuses what cannot work before anything
   is submitted: a GPU count the profile's nodes lack, a global batch the world size does not
   divide, and (``check_cluster``, when ``sinfo`` answers) an unknown partition, too many
   nodes, GPUs, CPUs or minutes for it.
2. ``submit`` writes each run's resolved recipe into its run directory (the job, and every
   requeue of it, trains exactly what was validated), submits one job or one job array, and
   records job id, run id and log paths under ``<runs root>/.slurm/jobs/`` for
   ``vlforge status`` and ``vlforge cancel``. It does not wait for the jobs.

Running (each task of the job is one rank): :class:`SlurmRun` exports torch.distributed's
variables from submitit's JobEnvironment (master = first node of the job, a port derived
from the job id) and trains. On preemption or an approaching time limit Slurm sends USR2
(``--signal=USR2@<signal_delay_s>``; on preemption thanks to ``preempt_send_user_signal``)
and the engine stops at the next step boundary with an atomic checkpoint and the status
``preempted``. Rank 0 then runs ``scontrol requeue``; the requeued job (same job id,
``SLURM_RESTART_COUNT`` + 1) resumes the same run id and directory from that checkpoint.
Requeues are bounded by ``launch.max_requeues``. A job that exits during the preemption
grace time without requeueing itself is *not* requeued by Slurm, which is why rank 0 does it.

Each task trains in a child process it supervises (:func:`supervise`): when that process dies
without a final status (SIGKILL from the OOM killer, a segfault), the task requeues the job
within the same bound, and the requeued job resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from vlforge.errors import UserError
from vlforge.hookspecs import hookimpl
from vlforge.launch.profiles import (
    ClusterProfile,
    ProfileError,
    available_profiles,
    find_profile,
    load_profile,
    slurm_minutes,
    unknown_profile,
)
from vlforge.launch.worker import EXIT_CODES, RunJob, run_job
from vlforge.recipe import Problem, Recipe, RecipeError
from vlforge.registry import did_you_mean

SLURM_DIR = ".slurm"  # under the runs root; a dot name is never an experiment


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SlurmPlan:
    """What will be asked of Slurm for one recipe: resources, limits, logs."""

    profile: ClusterProfile
    nodes: int
    tasks_per_node: int
    time_min: int
    max_requeues: int
    job_name: str
    log_dir: str  # submitit's folder; "%j" becomes the job id

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus_per_node(self) -> int:
        return self.tasks_per_node if self.profile.gpus_per_node else 0

    @property
    def python(self) -> str:
        return self.profile.python or shlex.quote(sys.executable)

    def parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``submitit.SlurmExecutor.update_parameters``."""
        p = self.profile
        optional = {
            "account": p.account,
            "qos": p.qos,
            "constraint": p.constraint,
            "gpus_per_node": self.gpus_per_node or None,
            "mem": f"{math.ceil(p.mem_per_task_gb * self.tasks_per_node * 1024)}M"
            if p.mem_per_task_gb
            else None,
        }
        return {
            "job_name": self.job_name,
            "partition": p.partition,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": p.cpus_per_task,
            "signal_delay_s": p.signal_delay_s,
            "stderr_to_stdout": True,  # one log per rank, errors in context
            "setup": list(p.setup) or None,
            "srun_args": list(p.srun_args) or None,
            # --requeue: Slurm may requeue the job (node failure, preemption past the grace time).
            "additional_parameters": {"requeue": True, **p.sbatch},
            **{k: v for k, v in optional.items() if v is not None},
        }

    def sbatch_script(self, array_size: int | None = None) -> str:
        """The batch script submitit will write (``array_size``: a job array of that many)."""
        from submitit.slurm.slurm import _make_sbatch_string  # submitit's own renderer

        command = f"{self.python} -u -m submitit.core._submit {shlex.quote(self.log_dir)}"
        return _make_sbatch_string(
            command=command, folder=self.log_dir, map_count=array_size, **self.parameters()
        )

    def describe(self, recipe: Recipe) -> str:
        """The plan in words, for ``--dry-run`` and submission messages."""
        p, train = self.profile, recipe.train
        device = f"{self.gpus_per_node} GPU(s) per node, NCCL" if self.gpus_per_node else "CPU, gloo"
        per_rank = train.batch_size // (self.world_size * train.accum_steps)
        return "\n".join(
            [
                f"slurm: profile {p.name} ({p.path}), partition {p.partition}",
                f"world size {self.world_size} = {self.nodes} node(s) × {self.tasks_per_node} "
                f"task(s) per node ({device})",
                f"global batch {train.batch_size} = {self.world_size} ranks × {train.accum_steps} "
                f"accumulation × {per_rank} per rank",
                f"time limit {self.time_min} min; USR2 {p.signal_delay_s} s before it or on "
                f"preemption -> checkpoint and requeue (at most {self.max_requeues} times)",
                f"logs under {self.log_dir.replace('%j', '<job id>')}",
            ]
        )


def plan_launch(recipe: Recipe, recipe_path: str, root: str) -> SlurmPlan:
    """Resolve ``recipe``'s profile into a plan; raises RecipeError / ProfileError on any problem."""
    launch = recipe.launch
    if not launch.profile:
        message = (
            'the slurm launcher needs a cluster profile, e.g. launch.profile = "dev" '
            f"(profiles: {', '.join(available_profiles())})"
        )
        raise RecipeError(recipe_path, [Problem("launch.profile", message, recipe_path)])
    path = find_profile(launch.profile, Path(recipe_path).parent)
    if path is None:
        raise RecipeError(
            recipe_path, [Problem("launch.profile", unknown_profile(launch.profile), recipe_path)]
        )
    profile = load_profile(path)
    problems: list[Problem] = []
    tasks = launch.nproc or profile.gpus_per_node or 1
    if profile.gpus_per_node and tasks > profile.gpus_per_node:
        problems.append(
            Problem(
                "launch.nproc",
                f"{tasks} processes per node need {tasks} GPUs, but the nodes of profile "
                f"'{profile.name}' have {profile.gpus_per_node} (one process per GPU)",
                recipe_path,
            )
        )
    world = launch.nodes * tasks
    if recipe.train.batch_size % (world * recipe.train.accum_steps):
        problems.append(
            Problem(
                "train.batch_size",
                f"global batch {recipe.train.batch_size} is not divisible by accum_steps × world size "
                f"= {recipe.train.accum_steps} × {world}",
                recipe_path,
            )
        )
    time_min = profile.time_min
    if launch.time_limit is not None:
        try:
            time_min = slurm_minutes(launch.time_limit)
        except ValueError as exc:
            problems.append(Problem("launch.time_limit", str(exc), recipe_path))
    log_dir = profile.log_dir or f"{root.rstrip('/')}/{SLURM_DIR}/logs"
    if "://" in log_dir:
        problems.append(
            Problem(
                "log_dir", f"Slurm writes logs to a shared path, not to {log_dir}; set log_dir", profile.path
            )
        )
    if problems:
        raise ProfileError(f"slurm launch of {recipe_path} with profile '{profile.name}'", problems)
    return SlurmPlan(
        profile=profile,
        nodes=launch.nodes,
        tasks_per_node=tasks,
        time_min=time_min,
        max_requeues=launch.max_requeues,
        job_name=f"vlforge-{recipe.name}",
        log_dir=f"{log_dir}/%j",
    )


# --------------------------------------------------------------------------- the cluster


@dataclass
class Partition:
    """What ``sinfo`` says about one partition (maxima over its node groups)."""

    name: str
    nodes: int = 0
    cpus: int = 0
    gpus: int = 0
    max_minutes: int | None = None  # None: no limit


def cluster_partitions() -> dict[str, Partition] | None:
    """Partitions of the cluster this machine submits to; None when ``sinfo`` is not there."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-a", "-o", "%R|%D|%c|%G|%l"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        raise UserError(f"sinfo failed: {out.stderr.strip()}")
    partitions: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, cpus, gres, limit = line.split("|")
        part = partitions.setdefault(name, Partition(name))
        part.nodes += int(nodes)
        part.cpus = max(part.cpus, int(cpus.rstrip("+")))
        part.gpus = max(part.gpus, _gpus_in_gres(gres))
        if limit not in ("infinite", "UNLIMITED", "n/a"):
            part.max_minutes = max(part.max_minutes or 0, slurm_minutes(limit))
    return partitions


def _gpus_in_gres(gres: str) -> int:
    """GPUs per node in a sinfo %G field: "gpu:8", "gpu:a100:8(S:0-1)", "(null)"."""
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            return int(fields[-1])
    return 0


def check_cluster(plan: SlurmPlan, recipe_path: str) -> list[Problem]:
    """What the cluster cannot give ``plan``; empty when all fits or ``sinfo`` is unavailable."""
    partitions = cluster_partitions()
    if partitions is None:
        return []
    p = plan.profile
    part = partitions.get(p.partition)
    if part is None:
        names = sorted(partitions)
        message = (
            f"partition '{p.partition}' does not exist on this cluster"
            f"{did_you_mean(p.partition, names)} (partitions: {', '.join(names)})"
        )
        return [Problem("partition", message, p.path)]
    problems = []
    if plan.nodes > part.nodes:
        problems.append(
            Problem(
                "launch.nodes",
                f"{plan.nodes} nodes asked; partition '{part.name}' has {part.nodes}",
                recipe_path,
            )
        )
    if plan.gpus_per_node > part.gpus:
        problems.append(
            Problem(
                "gpus_per_node",
                f"{plan.gpus_per_node} GPUs per node asked; partition '{part.name}' nodes have {part.gpus}",
                p.path,
            )
        )
    cpus = plan.tasks_per_node * p.cpus_per_task
    if cpus > part.cpus:
        problems.append(
            Problem(
                "cpus_per_task",
                f"{plan.tasks_per_node} tasks × {p.cpus_per_task} CPUs = {cpus} per node; nodes of "
                f"partition '{part.name}' have {part.cpus}",
                p.path,
            )
        )
    if part.max_minutes is not None and plan.time_min > part.max_minutes:
        problems.append(
            Problem(
                "time_limit",
                f"{plan.time_min} min asked; partition '{part.name}' allows {part.max_minutes}",
                p.path,
            )
        )
    return problems


def ensure_fits(plan: SlurmPlan, recipe_path: str) -> None:
    problems = check_cluster(plan, recipe_path)
    if problems:
        what = f"slurm launch of {recipe_path} with profile '{plan.profile.name}'"
        raise ProfileError(what, problems)


# --------------------------------------------------------------------------- submitting


@dataclass(frozen=True)
class PlannedRun:
    """A run to submit: its job, its validated recipe, and what sets it apart (for status)."""

    job: RunJob
    recipe: Recipe
    label: tuple[str, ...] = ()  # e.g. the overrides of a sweep element


@dataclass(frozen=True)
class Submission:
    """One submitted job (or array element) and its run; saved as ``.slurm/jobs/<job id>.json``."""

    job_id: str
    run_id: str
    experiment: str
    run_dir: str
    recipe_name: str
    steps: int
    world_size: int
    partition: str
    log: str  # rank 0's log; rank r writes <job id>_<r>_log.out next to it
    submitted: str
    overrides: list[str] = field(default_factory=list)


def submit(plan: SlurmPlan, runs: list[PlannedRun], root: str) -> list[Submission]:
    """Submit ``runs`` as one job (one run) or one job array; returns what was submitted."""
    import fsspec

    from vlforge.results.rundir import utc_now, write_atomic

    tasks = [SlurmRun(_with_recipe_snapshot(run), plan.max_requeues) for run in runs]
    executor = submitit.SlurmExecutor(
        folder=plan.log_dir, max_num_timeout=plan.max_requeues, python=plan.python
    )
    executor.update_parameters(**plan.parameters())
    with submitit.helpers.clean_env():  # a submission from inside a job must not inherit its SLURM_*
        submitted = executor.submit_array(tasks)
    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{SLURM_DIR}/jobs")
    fs.makedirs(base, exist_ok=True)
    records, now = [], utc_now()
    for slurm_job, run in zip(submitted, runs):
        record = Submission(
            job_id=slurm_job.job_id,
            run_id=run.job.run_id,
            experiment=run.job.experiment,
            run_dir=run.job.run_dir,
            recipe_name=run.recipe.name,
            steps=run.recipe.train.steps,
            world_size=plan.world_size,
            partition=plan.profile.partition,
            log=str(slurm_job.paths.stdout).replace("%t", "0"),
            submitted=now,
            overrides=list(run.label),
        )
        write_atomic(fs, f"{base}/{record.job_id}.json", json.dumps(asdict(record), indent=2).encode())
        records.append(record)
    return records


def _with_recipe_snapshot(run: PlannedRun) -> RunJob:
    """The run's job reading its resolved recipe from its run directory (written here unless
    resuming, where it is already there): every attempt trains what was validated now."""
    import fsspec

    from vlforge.results.rundir import write_atomic

    job = run.job
    if job.evaluate is not None:  # `vlforge eval`: the evaluated run's own recipe.toml stays as it is
        return job
    if not job.resume:
        fs, path = fsspec.core.url_to_fs(job.run_dir)
        fs.makedirs(path, exist_ok=True)
        write_atomic(fs, f"{path}/recipe.toml", run.recipe.to_toml().encode())
    return replace(job, recipe_path=f"{job.run_dir}/recipe.toml", overrides=())


def print_dry_run(plan: SlurmPlan, recipe: Recipe, array_size: int | None = None) -> int:
    print(plan.describe(recipe))
    print("sbatch script:")
    print(textwrap.indent(plan.sbatch_script(array_size), "  "))
    print("nothing was submitted")
    return 0


def print_submissions(records: list[Submission], plan: SlurmPlan) -> None:
    for record in records:
        overrides = f" [{' '.join(record.overrides)}]" if record.overrides else ""
        print(f"vlforge: run {record.run_id} submitted as Slurm job {record.job_id}{overrides}")
        print(f"  run dir  {record.run_dir}")
        print(f"  log      {record.log}  (rank r: _<r>_log.out)")
    print(
        f"vlforge: {plan.world_size} task(s) per job on partition {plan.profile.partition}; "
        "follow with `vlforge status`, stop with `vlforge cancel <run or job id>`"
    )


def read_submissions(root: str) -> list[Submission]:
    """Every recorded submission under ``root``, newest first."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{SLURM_DIR}/jobs")
    if not fs.exists(base):
        return []
    paths = [p for p in fs.ls(base, detail=False) if p.endswith(".json")]
    texts = fs.cat(paths) if paths else {}
    records = [Submission(**json.loads(text)) for text in texts.values()]
    in_array_order = sorted(records, key=lambda r: [int(part) for part in r.job_id.split("_")])
    return sorted(in_array_order, key=lambda r: r.submitted, reverse=True)


# --------------------------------------------------------------------------- on the nodes


class SlurmRun(submitit.helpers.Checkpointable):
    """What every task of a vlforge Slurm job runs: a supervisor of the rank's training process.

    Every stop goes through the training loop: a stop signal (USR2, SIGTERM, SIGINT) goes on to
    the training process; one that arrives while the run is being set up is held and handed to
    the loop at its first step, which
    then checkpoints at that step's end like any other stop. Only in the moment before this
    object runs is submitit's own handler in charge; as this is a Checkpointable, it then
    requeues the job unchanged (nothing was trained yet).
    """

    def __init__(self, job: RunJob, max_requeues: int) -> None:
        self.job = job
        self.max_requeues = max_requeues

    def __call__(self) -> str:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _forward_signal)
        env = submitit.JobEnvironment()
        # RANK, LOCAL_RANK, WORLD_SIZE; MASTER_ADDR = first node; MASTER_PORT seeded by the job id.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        job = replace(
            self.job,
            resume=self.job.resume or restarts > 0,
            extra_plugins=(*self.job.extra_plugins, __name__),  # for vlforge_step_start below
        )
        if job.evaluate is None and _read_status_json(job.run_dir).get("status") == "completed":
            print(f"vlforge: run {job.run_id} is already completed; nothing to do")
            return "completed"
        if restarts > self.max_requeues:
            return self._give_up(job, restarts, env.global_rank)
        status, crash = supervise(job)
        if crash is not None:
            return self._after_crash(job, env, restarts, crash)
        if status == "preempted" and env.global_rank == 0:
            print(f"vlforge: {requeue_self(env.job_id, restarts, self.max_requeues)}", flush=True)
        return status

    def _after_crash(self, job: RunJob, env: Any, restarts: int, crash: str) -> str:
        """The training process died without a final status: requeue the job (it resumes from
        the newest intact checkpoint), or end the run ``failed`` once the requeues are spent.

        Any rank whose training process crashed requeues: the others then fail in a collective,
        with a final status that is not the cause. Only the first requeue of an allocation
        happens (``requeue_refusal``: the job is no longer RUNNING after it).
        """
        refusal = requeue_refusal(job_state(env.job_id), restarts, self.max_requeues)
        where = f"{crash} on rank {env.global_rank}"
        print(f"vlforge: {where}", flush=True)
        if refusal is None:
            # status.json first: the requeue ends this allocation (SIGTERM) soon after.
            end_crashed_attempt(job.run_dir, f"{where}; requeued to resume from the last checkpoint")
            print(f"vlforge: {requeue_self(env.job_id, restarts, self.max_requeues)}", flush=True)
        elif env.global_rank == 0 and restarts >= self.max_requeues:
            resume = f"continue it with `vlforge run <recipe> --resume {job.run_id}`"
            end_crashed_attempt(job.run_dir, f"{where}; job {env.job_id} not requeued: {refusal}; {resume}")
        return "failed"

    def _give_up(self, job: RunJob, restarts: int, rank: int) -> str:
        """Slurm requeued the job more often than allowed: leave the run preempted, say why."""
        reason = (
            f"requeued {restarts} times, more than launch.max_requeues = {self.max_requeues}; "
            f"continue it with `vlforge run <recipe> --resume {job.run_id}`"
        )
        print(f"vlforge: not training: {reason}")
        if rank == 0 and _read_status_json(job.run_dir):
            from vlforge.results.rundir import RunWriter

            RunWriter.open(job.run_dir).close("preempted", reason)
        return "preempted"


# --------------------------------------------------------------------------- the supervisor

# A task trains in a child process, so that it outlives a training process that dies without
# a word (the OOM killer's SIGKILL, a segfault) and can requeue the job. The child's stdout
# and stderr are the task's: its lines stay in the rank's Slurm log.
_child: Any = None  # the training process while it runs
_received: list[int] = []  # stop signals this task got: the child's death by one was asked for


def supervise(job: RunJob) -> tuple[str, str | None]:
    """Train ``job`` in a child process; returns (status, None), or ("failed", what went wrong)
    when the child died without a final status."""
    import multiprocessing

    global _child
    os.environ["PYTHONUNBUFFERED"] = "1"  # the child's lines reach the log as they are printed
    _child = multiprocessing.get_context("spawn").Process(target=_train_in_child, args=(job,))
    _child.start()
    for sig in list(_received):  # arrived while the child was being started
        os.kill(_child.pid, sig)
    _child.join()
    code, _child = _child.exitcode, None
    return _child_outcome(code, job.run_dir)


def _child_outcome(code: int, run_dir: str) -> tuple[str, str | None]:
    """What the training process's exit code (negative: killed by that signal) says."""
    from vlforge.engine import STOP_SIGNALS as STOP_STATUS

    if code < 0:
        sig = signal.Signals(-code)
        if -code in _received:  # a stop signal that came before its handlers: a stop all the same
            return STOP_STATUS.get(sig, "failed"), None
        return "failed", f"the training process was killed by {sig.name}"
    status = {exit_code: name for name, exit_code in EXIT_CODES.items()}.get(code)
    if status is None:
        return "failed", f"the training process exited with code {code} and no final status"
    # Rank 0 closes the run: its writer still "running" means it died first. (Another rank that
    # fails by itself may see "running" too, before rank 0 has closed the run.)
    writer_died = os.environ.get("RANK", "0") == "0" and _read_status_json(run_dir).get("status") == "running"
    if status == "failed" and writer_died:
        return "failed", "the training process exited without a final status"
    return status, None


def _train_in_child(job: RunJob) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _hold_signal)
    sys.exit(EXIT_CODES[run_job(job)])


def _forward_signal(signum: int, _frame: Any) -> None:
    """The task's handler: a stop signal goes on to the training process (held until it runs)."""
    _received.append(signum)
    if _child is not None and _child.pid is not None:
        os.kill(_child.pid, signum)


def end_crashed_attempt(run_dir: str, reason: str) -> None:
    """Record in ``status.json`` that the run's last attempt failed (its writer died with it)."""
    import fsspec

    from vlforge.results.rundir import RunLockedError, read_json, take_run_lock, utc_now, write_atomic

    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{path}/status.json"):  # died before the run directory had a status
        return
    try:
        lock = take_run_lock(run_dir)  # a dead writer's lock is taken over
    except RunLockedError:  # rank 0's writer still lives (another rank crashed): it records its end
        return
    try:
        status = read_json(fs, f"{path}/status.json")
        end = utc_now()
        status.update(status="failed", reason=reason, end_time=end)
        if status["attempts"]:
            status["attempts"][-1].update(end_time=end, status="failed", reason=reason)
        write_atomic(fs, f"{path}/status.json", json.dumps(status, indent=2).encode())
    finally:
        lock.release()


# Signals that stop a run (vlforge.engine.STOP_SIGNALS): USR2 (submitit's --signal, before
# the time limit and on preemption), SIGTERM (scancel, the end of a time limit or of a
# preemption grace time), SIGINT (`vlforge cancel`).
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
_held_signals: list[int] = []  # arrived before the training loop installed its handlers


def _hold_signal(signum: int, _frame: Any) -> None:
    _held_signals.append(signum)


@hookimpl
def vlforge_step_start(state: Any) -> None:
    """Deliver held stop signals again, now that the training loop handles them."""
    while _held_signals:
        os.kill(os.getpid(), _held_signals.pop())


def _read_status_json(run_dir: str) -> dict[str, Any]:
    """The run's status.json, or {} before the run has started."""
    import fsspec

    from vlforge.results.rundir import read_json

    fs, path = fsspec.core.url_to_fs(run_dir)
    return read_json(fs, f"{path}/status.json") if fs.exists(f"{path}/status.json") else {}


def requeue_refusal(state: str, restarts: int, max_requeues: int) -> str | None:
    """Why a job whose run stopped as preempted must not requeue itself; None: requeue it.

    Only a RUNNING job requeues: one being cancelled shows COMPLETING (scancel), and one
    Slurm already requeued is PENDING or PREEMPTED.
    """
    if restarts >= max_requeues:
        return f"already requeued {restarts} time(s), launch.max_requeues = {max_requeues}"
    if state != "RUNNING":
        return f"the job is {state}, not RUNNING (cancelled, or requeued by Slurm)"
    return None


def requeue_self(job_id: str, restarts: int, max_requeues: int) -> str:
    """Requeue this job after its run stopped as preempted; returns what happened, for the log."""
    refusal = requeue_refusal(job_state(job_id), restarts, max_requeues)
    if refusal:
        return f"job {job_id} not requeued: {refusal}"
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"job {job_id} not requeued: scontrol requeue failed: {done.stderr.strip()}"
    return f"job {job_id} requeued ({restarts + 1} of at most {max_requeues} requeues)"


def job_state(job_id: str) -> str:
    """A job's state as slurmctld sees it now (RUNNING, COMPLETING, PENDING, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60
    )
    for item in out.stdout.split():
        if item.startswith("JobState="):
            return item.split("=", 1)[1]
    return "UNKNOWN"


# --------------------------------------------------------------------------- status and cancel


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state per job id (array elements as ``<array>_<index>``), from sacct.

    Falls back to squeue (which forgets jobs minutes after they end) on clusters without
    accounting; job ids neither knows are absent from the result.
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    ids = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not ids:
        return {}
    commands = [
        ["sacct", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
        ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)],
    ]
    for command in commands:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise UserError(f"{command[0]} not found: is this a Slurm login node?") from None
        if out.returncode == 0:
            text = out.stdout if command[0] == "sacct" else "JobID|State\n" + out.stdout
            info = SlurmInfoWatcher().read_info(text)
            return {job_id: stats["State"].split()[0] for job_id, stats in info.items()}
    raise UserError(f"neither sacct nor squeue answered: {out.stderr.strip()}")


def status_rows(records: list[Submission]) -> tuple[list[str], list[tuple]]:
    """The ``vlforge status`` table of ``records``: Slurm state, run status, progress."""
    states = slurm_states([r.job_id for r in records])
    rows = []
    for record in records:
        run = _read_status_json(record.run_dir)
        rows.append(
            (
                record.job_id,
                record.run_id,
                record.recipe_name,
                states.get(record.job_id, "UNKNOWN"),
                run.get("status", "submitted"),
                f"{run.get('last_step') or 0}/{record.steps}",
                max(len(run.get("attempts", [])) - 1, 0),
                " ".join(record.overrides),
            )
        )
    columns = ["job", "run", "recipe", "slurm", "run status", "step", "requeues", "overrides"]
    return columns, rows


FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def cancel(root: str, refs: list[str], now: bool = False) -> list[str]:
    """Stop the jobs of runs or job ids in ``refs``; returns one line per job.

    Running jobs get SIGINT: each rank stops at the next step boundary, checkpoints, and the
    run ends ``interrupted`` (resumable, not requeued). ``now``, or a job not yet running:
    ``scancel`` at once.
    """
    records = read_submissions(root)
    chosen = [r for r in records if r.job_id in refs or r.run_id in refs]
    unknown = [ref for ref in refs if not any(ref in (r.job_id, r.run_id) for r in chosen)]
    if unknown:
        raise UserError(f"no submitted run or job {', '.join(unknown)} under {root} (see `vlforge status`)")
    states = slurm_states([r.job_id for r in chosen])
    lines = []
    for record in chosen:
        state = states.get(record.job_id, "UNKNOWN")
        if state in FINISHED_STATES:  # e.g. the first job of a run resumed since
            lines.append(f"job {record.job_id} (run {record.run_id}): already {state}")
            continue
        graceful = state == "RUNNING" and not now
        command = ["scancel", "--signal=INT", record.job_id] if graceful else ["scancel", record.job_id]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise UserError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        action = "asked to stop at the next step (SIGINT)" if graceful else f"cancelled (was {state})"
        lines.append(f"job {record.job_id} (run {record.run_id}): {action}")
    return lines

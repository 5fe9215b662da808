"""Results index at scale: ingestion, index size and query latency, against MLflow.

Writes a corpus of runs through the real RunWriter (default 2,000 runs × 2,000 steps × 5
metrics = 20 M metric rows, plus evals, configs and a checkpoint each), indexes it, and times:
a full build, a no-op re-index, ingesting one more run, and every query in docs/results.md
(median of 5 on an open connection, and once more end to end through ``query()``).

With MLflow importable (``pip install mlflow-skinny sqlalchemy alembic``; not a vlforge
dependency) the same runs go into MLflow's local store (``sqlite:///mlflow.db``): runs and params
through the MLflow client, metric rows bulk-inserted into its tables (the client logs about 6 k
rows/s, ~1 h for 20 M rows; its rate is measured on a sample and reported), then the equivalent
"best runs", "curve of a run" and "mean over seeds" queries run through the MLflow client.

    python bench/results_index.py [--runs 2000] [--steps 2000] [--dir /tmp/vlforge-bench] [--reuse]

Prints a table and writes bench/results/results_index.json. Goal: every query < 200 ms and
≥ 10× faster than MLflow.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from record import record  # bench/ is on sys.path when run as a script

from vlforge.results import RunWriter, build_index, connect, query
from vlforge.results.index import flatten_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
METRICS = ("train/loss", "train/lr", "train/samples_per_s", "train/epoch", "train/grad_norm")
LR_VALUES, RATIOS, SEEDS = (1e-4, 3e-4, 1e-3), (0.0, 0.25, 0.5, 0.75), 5


# -- the corpus -------------------------------------------------------------------------------


def run_config(i: int) -> dict[str, Any]:
    """A realistic resolved recipe (about 40 keys); lr, masking ratio, momentum and seed vary."""
    lr, ratio = LR_VALUES[i % 3], RATIOS[(i // 3) % 4]
    return {
        "name": "flip_vitb16",
        "experiment": "bench",
        "seed": (i // 12) % SEEDS,
        "model": {
            "vision": {
                "type": "timm.vit",
                "model": "vit_base_patch16_224",
                "img_size": 224,
                "patch_size": 16,
            },
            "text": {"type": "hf.text", "max_length": 32, "embed_dim": 512, "tokenizer": "bert-base-uncased"},
        },
        "masking": {"type": "flip.random", "ratio": ratio},
        "teacher": {"type": "ema", "momentum": (0.99, 0.995)[i % 2]},
        "objectives": {"contrastive": {"type": "clip.infonce", "weight": 1.0, "temperature": 0.07}},
        "data": {"type": "webdataset", "urls": "s3://laion/{00000..23000}.tar", "workers": 8},
        "optim": {"type": "adamw", "lr": lr, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6},
        "schedule": {"type": "cosine", "warmup_steps": 200},
        "train": {"steps": 2000, "batch_size": 32768, "precision": "bf16", "accum_steps": 1},
        "launch": {"launcher": "slurm", "nodes": 4, "nproc": 8, "partition": "a100"},
    }


def write_run(args: tuple[str, str, int, int]) -> None:
    root, experiment, i, steps = args
    rng = random.Random(i)
    config = run_config(i)
    world = (8, 16, 64, 256)[i % 4]
    run = RunWriter.create(
        root, experiment, recipe_name="flip_vitb16", recipe_toml="", config=config, world_size=world
    )
    lr, ratio = config["optim"]["lr"], config["masking"]["ratio"]
    for step in range(steps):
        loss = 4.0 / (1 + step * lr * 20) + ratio / 2 + rng.gauss(0, 0.02)
        values = (loss, lr, 1000.0 * world * (1 - ratio * 0.6) + rng.gauss(0, 5), step / 500, rng.random())
        run.log_metrics(step, dict(zip(METRICS, values)))
        if step and step % 1000 == 0 or step == steps - 1:
            run.log_eval(
                step, "zeroshot", {"top1": 0.5 - loss / 10, "top5": 0.8 - loss / 10}, dataset="imagenet"
            )
    ckpt = f"{run.run_dir}/checkpoints"
    os.makedirs(ckpt, exist_ok=True)
    Path(ckpt, f"step_{steps:08d}.pt").write_bytes(b"\0" * 1024)
    if i % 100 == 7:
        run.close("failed", "non-finite loss")
    elif i % 100 == 13:
        run.flush()  # never closed: indexed as stale
    else:
        run.close()


def generate(root: str, runs: int, steps: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(write_run, [(root, "bench", i, steps) for i in range(runs)], chunksize=4)
    return time.perf_counter() - start


# -- vlforge ----------------------------------------------------------------------------------


def timed(fn, repeat: int = 5) -> float:
    """Median wall seconds of ``repeat`` calls after one warm-up call."""
    return timed_cpu(fn, repeat)[0]


def timed_cpu(fn, repeat: int = 5) -> tuple[float, float]:
    """Median wall and CPU seconds (all threads of this process) of ``repeat`` calls after a warm-up.

    CPU time barely moves when other processes compete for the cores; wall time does.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def documented_queries() -> list[tuple[str, str]]:
    """(title, sql) for each example in docs/results.md; the title is the sentence before it."""
    text = DOCS.read_text()
    return [
        (title.strip().rstrip(":"), sql)
        for title, sql in re.findall(r"\n([^\n]+)\n\n```sql\n(.*?)```", text, re.S)
    ]


def bench_vlforge(root: str, runs: int, steps: int, curve_run: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    start = time.perf_counter()
    build_index(root, rebuild=True)
    out["full_build_s"] = time.perf_counter() - start
    out["index_mb"] = os.path.getsize(f"{root}/index.duckdb") / 1e6
    out["run_files_mb"] = (
        sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file()) / 1e6 - out["index_mb"]
    )
    start = time.perf_counter()
    build_index(root)
    out["noop_reindex_s"] = time.perf_counter() - start
    write_run((root, "extra", runs, steps))
    start = time.perf_counter()
    build_index(root)
    out["one_new_run_reindex_s"] = time.perf_counter() - start
    shutil.rmtree(f"{root}/extra")
    build_index(root)  # back to the corpus proper

    con = connect(root)
    out["rows"] = dict(
        con.execute(
            "SELECT 'metrics', count(*) FROM metrics UNION ALL SELECT 'runs', count(*) FROM runs "
            "UNION ALL SELECT 'evals', count(*) FROM evals UNION ALL SELECT 'configs', count(*) FROM configs"
        ).fetchall()
    )
    queries = [*documented_queries(), *equivalents(curve_run)["vlforge"].items()]
    out["queries"] = {}
    for title, sql in queries:
        warm, cpu = timed_cpu(lambda sql=sql: con.execute(sql).fetchall())
        cold = timed(lambda sql=sql: query(root, sql), repeat=3)  # connect + run + format
        out["queries"][title] = {"warm_ms": warm * 1e3, "cpu_ms": cpu * 1e3, "end_to_end_ms": cold * 1e3}
    out["load_average_after_queries"] = os.getloadavg()
    con.close()
    return out


def equivalents(curve_run: str) -> dict[str, dict[str, Any]]:
    """The same three questions for both systems (the MLflow side is called with a client)."""
    return {
        "vlforge": {
            "[vs MLflow] best 10 runs by final loss, lr = 3e-4": (
                "SELECT m.run_id, m.value FROM metrics_last m JOIN configs c USING (run_id) WHERE m.name = "
                "'train/loss' AND c.key = 'optim.lr' AND c.value_num = 3e-4 ORDER BY m.value LIMIT 10"
            ),
            "[vs MLflow] curve of a run": (
                f"SELECT step, value FROM metrics WHERE run_id = '{curve_run}' AND name = 'train/loss' "
                "ORDER BY step"
            ),
            "[vs MLflow] final loss mean/std over seeds per (lr, ratio)": (
                "SELECT (r.config->'$.optim.lr')::DOUBLE AS lr, "
                "(r.config->'$.masking.ratio')::DOUBLE AS ratio, avg(m.value), stddev_samp(m.value) "
                "FROM metrics_last m JOIN runs r USING (run_id) WHERE m.name = 'train/loss' GROUP BY ALL"
            ),
        }
    }


# -- MLflow -----------------------------------------------------------------------------------


def bench_mlflow(root: str, workdir: str, curve_run: str) -> dict[str, Any] | None:
    try:
        import mlflow
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        print(
            "mlflow is not installed: skipping the comparison (pip install mlflow-skinny sqlalchemy alembic)"
        )
        return None
    db = f"{workdir}/mlflow.db"
    if os.path.exists(db):
        os.remove(db)
    uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("bench")
    out: dict[str, Any] = {"version": mlflow.__version__, "store": "sqlite (MLflow's default local store)"}

    # The client's own logging rate, on a sample run.
    sample = client.create_run(exp, run_name="sample")
    rows = [Metric(name, 0.5, 0, step) for step in range(2000) for name in METRICS]
    start = time.perf_counter()
    for i in range(0, len(rows), 1000):
        client.log_batch(sample.info.run_id, metrics=rows[i : i + 1000])
    out["log_batch_rows_per_s"] = len(rows) / (time.perf_counter() - start)
    client.delete_run(sample.info.run_id)

    con = connect(root)
    runs = con.execute("SELECT run_id, config::VARCHAR FROM runs ORDER BY run_id").fetchall()
    start = time.perf_counter()
    uuids = {}
    for run_id, config in runs:
        run = client.create_run(exp, run_name=run_id)
        params = [Param(leaf["key"], leaf["value"]) for leaf in flatten_config(json.loads(config))]
        client.log_batch(run.info.run_id, params=params[:100])
        client.set_terminated(run.info.run_id)
        uuids[run_id] = run.info.run_id
    out["create_runs_with_params_s"] = time.perf_counter() - start

    start = time.perf_counter()
    db_con = sqlite3.connect(db)
    reader = con.sql("SELECT name, value, epoch_ms(time) AS ts, run_id, step FROM metrics").to_arrow_reader()
    for batch in reader:
        c = batch.to_pydict()
        db_con.executemany(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, 0)",
            zip(c["name"], c["value"], c["ts"], map(uuids.get, c["run_id"]), c["step"]),
        )
    db_con.execute(
        """INSERT OR REPLACE INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
        SELECT key, value, timestamp, step, is_nan, run_uuid FROM (SELECT *, row_number() OVER
        (PARTITION BY run_uuid, key ORDER BY step DESC, timestamp DESC) AS rn FROM metrics) WHERE rn = 1"""
    )
    db_con.commit()
    db_con.close()
    con.close()
    out["bulk_insert_metrics_s"] = time.perf_counter() - start
    out["db_mb"] = os.path.getsize(db) / 1e6

    def best() -> Any:
        return mlflow.search_runs(
            [exp],
            filter_string="params.`optim.lr` = '0.0003'",
            order_by=["metrics.`train/loss` ASC"],
            max_results=10,
        )

    def curve() -> Any:
        return client.get_metric_history(uuids[curve_run], "train/loss")

    def seeds() -> Any:
        df = mlflow.search_runs([exp], max_results=50_000)
        keys = ["params.optim.lr", "params.masking.ratio"]
        return df.groupby(keys)["metrics.train/loss"].agg(["mean", "std"])

    assert len(best()) == 10 and len(curve()) > 0 and len(seeds()) == len(LR_VALUES) * len(RATIOS)
    titles = list(equivalents(curve_run)["vlforge"])
    out["queries"] = {t: {"ms": timed(fn, repeat=3) * 1e3} for t, fn in zip(titles, (best, curve, seeds))}
    return out


# -- report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, gen_s: float | None, ours: dict, theirs: dict | None) -> dict[str, Any]:
    print(f"\nload average at start: {', '.join(f'{x:.1f}' for x in args.load_at_start)}")
    print(f"corpus: {args.runs} runs × {args.steps} steps × {len(METRICS)} metrics  ({args.dir})")
    if gen_s is not None:
        print(f"  written by RunWriter in {gen_s:.1f} s")
    print(f"  rows: {ours['rows']}")
    print(f"  run files {ours['run_files_mb']:.0f} MB, index {ours['index_mb']:.0f} MB")
    rate = ours["rows"]["metrics"] / ours["full_build_s"] / 1e6
    print(f"  full build {ours['full_build_s']:.1f} s ({rate:.2f} M metric rows/s)")
    print(f"  no-op re-index {ours['noop_reindex_s']:.2f} s, +1 run {ours['one_new_run_reindex_s']:.2f} s")
    print(f"\n{'query':<64} {'warm ms':>8} {'cpu ms':>8} {'e2e ms':>8} {'MLflow ms':>10} {'×':>6}")
    for title, t in ours["queries"].items():
        ml = (theirs or {}).get("queries", {}).get(title)
        extra = f"{ml['ms']:>10.1f} {ml['ms'] / t['warm_ms']:>6.0f}" if ml else ""
        print(f"{title[:64]:<64} {t['warm_ms']:>8.1f} {t['cpu_ms']:>8.1f} {t['end_to_end_ms']:>8.1f} {extra}")
    print(
        f"load average after the queries: {', '.join(f'{x:.1f}' for x in ours['load_average_after_queries'])}"
    )
    if theirs:
        rate = theirs["log_batch_rows_per_s"]
        print(f"\nMLflow {theirs['version']}, {theirs['store']}")
        hours = ours["rows"]["metrics"] / rate / 3600
        print(f"  client log_batch {rate:.0f} rows/s (≈{hours:.1f} h for these rows)")
        print(f"  runs + params via the client {theirs['create_runs_with_params_s']:.0f} s")
        print(
            f"  metrics bulk-inserted in {theirs['bulk_insert_metrics_s']:.0f} s; db {theirs['db_mb']:.0f} MB"
        )
    worst = max(t["warm_ms"] for t in ours["queries"].values())
    print(f"\nslowest vlforge query: {worst:.1f} ms (goal < 200 ms)")
    return {
        "corpus": {"runs": args.runs, "steps": args.steps, "metrics": len(METRICS)},
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": args.load_at_start},
        "generate_s": gen_s,
        "vlforge": ours,
        "mlflow": theirs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--dir", default="/tmp/vlforge-bench")
    parser.add_argument("--reuse", action="store_true", help="keep an existing corpus in --dir")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    args.load_at_start = os.getloadavg()  # other work on the machine inflates wall times
    root = f"{args.dir}/runs"
    gen_s = None
    if not (args.reuse and os.path.isdir(root)):
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(root)
        gen_s = generate(root, args.runs, args.steps)
    curve_run = sorted(p.name for p in Path(root, "bench").iterdir())[args.runs // 2]
    ours = bench_vlforge(root, args.runs, args.steps, curve_run)
    theirs = None if args.no_mlflow else bench_mlflow(root, args.dir, curve_run)
    record("results_index", report(args, gen_s, ours, theirs))


if __name__ == "__main__":
    main()

"""Strategy sweep: every (strategy, seed) of one experiment config, one results table, plots.

    python -m mtjax.sweep --config CONFIG \\
        --strategies all_at_once,round_robin,dynamic_difficulty_sampling,dsg,gradnorm,pcgrad,uncertainty \\
        --seeds 0,1,2 [--out DIR] [section.key=value ...]

A strategy is a name from STRATEGY_KEYS (a schedule, a loss weighting or a gradient
aggregator) or several joined by '+', e.g. `dsg+pcgrad`; each name becomes one config
override (table below), applied after the command-line overrides, plus `seed=<k>` and the
run's output directory. Every run is built and validated before the first one starts.

Runs go one after another in this process (`mtjax.train.Trainer`) into OUT/<strategy>/seed<k>;
a run directory already there is replaced (or, with --resume, reused when it finished with
the same experiment). A run that fails (e.g. stopped on non-finite steps) is recorded as
failed, and the sweep goes on. Written to OUT:
  results.md / results.csv   per strategy: mean ± std over the finished seeds of the test
                             per-task F1, average F1, hamming score, train steps/s and clips/s,
                             peak memory
  runs.csv                   one row per run (status, metrics, error)
  compare_*.png              mtjax.plot.plot_comparison: validation average F1 and per-task F1
                             per epoch, loss-weight and sample-weight histories
  COMMAND.txt                the command that made them
Measurement: steps/s = train steps / wall time of the train epochs after each run's first
(whose time includes compilation; a 1-epoch run reports its first epoch, marked *); clips/s
likewise from the trainer's per-epoch clips/s (real rows, padding excluded). Peak host RSS is
per run: the kernel's high-water mark (VmHWM) is reset before each run through
/proc/self/clear_refs and read after it (else resource.getrusage's process-wide ru_maxrss);
on GPU also jax's peak_bytes_in_use (process-wide: it cannot be reset). std is the sample
std (ddof=1) over the finished seeds, 0 for one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mtjax.config import ConfigError
from mtjax.experiment import (AGGREGATORS, SCHEDULES, WEIGHTINGS, ExperimentConfig, check_paths,
                              load_experiment)

# name -> the config key it sets (its value is the name itself).
STRATEGY_KEYS: dict[str, str] = {
    **{name: "strategy.schedule" for name in SCHEDULES},
    **{name: "loss.weighting" for name in WEIGHTINGS},
    **{name: "strategy.aggregator" for name in AGGREGATORS},
}
RUN_SUMMARY = "sweep_run.json"
METRIC_COLUMNS = ("average_f1", "hamming_score", "steps_per_s", "clips_per_s", "peak_rss_mb", "peak_device_mb")


class SweepError(ValueError):
    """A sweep that cannot be set up (bad strategy name, output dir, ...)."""


def known_strategies() -> str:
    groups = {"schedules": SCHEDULES, "weightings": WEIGHTINGS, "aggregators": AGGREGATORS}
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())


def strategy_overrides(strategy: str) -> list[str]:
    """'dsg+pcgrad' -> ['strategy.schedule=dsg', 'strategy.aggregator=pcgrad']."""
    parts = [p.strip() for p in strategy.split("+")]
    out, keys = [], {}
    for part in parts:
        if part not in STRATEGY_KEYS:
            raise SweepError(f"unknown strategy {part!r}" + (f" in {strategy!r}" if part != strategy else "")
                             + f"; known names ({known_strategies()}); combine them with '+'")
        key = STRATEGY_KEYS[part]
        if key in keys:
            raise SweepError(f"strategy {strategy!r} sets {key} twice ({keys[key]} and {part})")
        keys[key] = part
        out.append(f"{key}={part}")
    return out


# ----------------------------------------------------------------------------- planning

def plan_runs(config: str | Path, strategies: Sequence[str], seeds: Sequence[int], out: Path,
              overrides: Sequence[str] = ()) -> list[tuple[str, int, ExperimentConfig]]:
    """Every (strategy, seed, experiment), all validated before anything runs."""
    from mtjax.mtl.registry import make_weighting
    from mtjax.schedules import split_strategy_options

    if not strategies:
        raise SweepError("--strategies is empty")
    if len(set(strategies)) != len(strategies):
        raise SweepError(f"--strategies repeats a name: {list(strategies)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds must be distinct integers, got {list(seeds)}")
    base = load_experiment(config, overrides)
    check_paths(base)  # a missing dataset fails here, not once per run
    runs = []
    for strategy in strategies:
        extra = strategy_overrides(strategy)
        for seed in seeds:
            run_dir = out / strategy / f"seed{seed}"
            exp = load_experiment(config, [*overrides, *extra, f"seed={seed}", f"output_dir={run_dir}",
                                           f"name={base.name}-{strategy}-seed{seed}"])
            # strategy.options go to every run: each must suit the run's schedule/aggregator.
            split_strategy_options(exp.strategy.schedule, exp.strategy.options,
                                   has_aggregator=bool(exp.strategy.aggregator))
            if exp.strategy.aggregator and make_weighting(exp.loss.weighting).learnable:
                raise SweepError(f"strategy {strategy!r}: weighting {exp.loss.weighting!r} learns its weights from "
                                 f"the summed loss and cannot be combined with aggregator {exp.strategy.aggregator!r}")
            runs.append((strategy, seed, exp))
    return runs


# ----------------------------------------------------------------------------- measurement

def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM)
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_ok: bool) -> float:
    if reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2**20  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_device_mb() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU backends have none
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


@contextlib.contextmanager
def compile_cache(path: Path | None):
    """A persistent XLA compilation cache for the sweep: the seeds of one strategy compile the
    same programs, so only the first pays for compilation. The previous settings come back."""
    if path is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def _timed_trainer(exp: ExperimentConfig):
    from mtjax.train import Trainer

    class TimedTrainer(Trainer):
        """Times each train epoch (the loop pulls every step's metrics to the host, so the
        wall clock covers the device work)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.epoch_times: list[dict[str, float]] = []

        def train_epoch(self, epoch, log):
            step0 = int(np.asarray(self.state["train"].step))
            t0 = time.perf_counter()
            stats = super().train_epoch(epoch, log)
            seconds = time.perf_counter() - t0
            steps = int(np.asarray(self.state["train"].step)) - step0
            self.epoch_times.append({"epoch": epoch, "steps": steps, "seconds": seconds,
                                     "clips_per_s": float(stats["clips_per_s"])})
            return stats

    return TimedTrainer(exp)


def _rates(epoch_times: list[dict[str, float]]) -> tuple[float | None, float | None, bool]:
    """(steps/s, clips/s, includes_compile) over the epochs after the first."""
    timed = epoch_times[1:] or epoch_times[:1]
    seconds = sum(e["seconds"] for e in timed)
    if not timed or seconds <= 0:
        return None, None, False
    steps = sum(e["steps"] for e in timed)
    clips = sum(e["clips_per_s"] * e["seconds"] for e in timed)
    return steps / seconds, clips / seconds, len(epoch_times) < 2


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("experiment.json", "metrics.jsonl", RUN_SUMMARY, "checkpoints"))


def run_one(strategy: str, seed: int, exp: ExperimentConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train one run; never raises for a failed run (the summary says why)."""
    import jax

    run_dir = Path(exp.output_dir)
    summary_path = run_dir / RUN_SUMMARY
    if resume and summary_path.is_file():
        old = json.loads(summary_path.read_text())
        if old.get("status") == "ok" and old.get("experiment") == exp.to_dict():
            print(f"sweep: {strategy} seed {seed}: reusing the finished run in {run_dir}")
            return old
    if run_dir.exists():
        if not _is_run_dir(run_dir) and any(run_dir.iterdir()):
            raise SweepError(f"{run_dir} exists and is not a run directory; refusing to replace it")
        shutil.rmtree(run_dir)  # metrics.jsonl appends and checkpoints would mix two runs
    print(f"sweep: {strategy} seed {seed} -> {run_dir}", flush=True)
    reset_ok = _reset_peak_rss()
    summary: dict[str, Any] = {"strategy": strategy, "seed": seed, "run_dir": str(run_dir),
                               "experiment": exp.to_dict()}
    t0 = time.perf_counter()
    trainer = None
    try:
        trainer = _timed_trainer(exp)
        result = trainer.run()
        test = result["test"]
        summary.update(status="ok", error=None, best_epoch=result["best_epoch"],
                       test={"average_f1": test["average_f1"], "hamming_score": test["hamming_score"],
                             "f1": {t: v["f1"] for t, v in test["per_task"].items()}})
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded, not raised: one bad run must not end the sweep
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sweep_error.txt").write_text(traceback.format_exc())
        summary.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}", test=None)
        print(f"sweep: {strategy} seed {seed} FAILED: {summary['error']}", file=sys.stderr, flush=True)
    epoch_times = trainer.epoch_times if trainer is not None else []
    steps_per_s, clips_per_s, with_compile = _rates(epoch_times)
    summary.update(wall_s=time.perf_counter() - t0, epoch_times=epoch_times, steps_per_s=steps_per_s,
                   clips_per_s=clips_per_s, rate_includes_compile=with_compile,
                   peak_rss_mb=_peak_rss_mb(reset_ok), peak_rss_per_run=reset_ok,
                   peak_device_mb=_peak_device_mb())
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    del trainer
    gc.collect()
    jax.clear_caches()  # the next run builds its own step; keep memory flat across runs
    return summary


# ----------------------------------------------------------------------------- aggregation

def _mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0), len(xs)


def aggregate(summaries: Sequence[Mapping[str, Any]], strategies: Sequence[str],
              tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per strategy: n_runs, n_ok, n_failed and <metric>_mean / <metric>_std."""
    rows = []
    for strategy in strategies:
        runs = [s for s in summaries if s["strategy"] == strategy]
        ok = [s for s in runs if s["status"] == "ok"]
        row: dict[str, Any] = {"strategy": strategy, "n_runs": len(runs), "n_ok": len(ok),
                               "n_failed": len(runs) - len(ok)}
        columns = {f"f1_{t}": [s["test"]["f1"].get(t) for s in ok] for t in tasks}
        columns["average_f1"] = [s["test"]["average_f1"] for s in ok]
        columns["hamming_score"] = [s["test"]["hamming_score"] for s in ok]
        for key in ("steps_per_s", "clips_per_s", "peak_rss_mb", "peak_device_mb"):
            columns[key] = [s.get(key) for s in ok]
        for key, values in columns.items():
            row[f"{key}_mean"], row[f"{key}_std"], _ = _mean_std(values)
        row["rate_includes_compile"] = any(s.get("rate_includes_compile") for s in ok)
        row["errors"] = sorted({s["error"] for s in runs if s["status"] != "ok"})
        rows.append(row)
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_tables(out: Path, rows: list[dict[str, Any]], summaries: Sequence[Mapping[str, Any]],
                 tasks: Sequence[str], *, command: str, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    metric_keys = [f"f1_{t}" for t in tasks] + ["average_f1", "hamming_score", "steps_per_s", "clips_per_s",
                                                "peak_rss_mb", "peak_device_mb"]
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "n_runs", "n_ok", "n_failed"]
                   + [f"{k}_{s}" for k in metric_keys for s in ("mean", "std")] + ["errors"])
        for r in rows:
            w.writerow([r["strategy"], r["n_runs"], r["n_ok"], r["n_failed"]]
                       + [("" if not math.isfinite(r[f"{k}_{s}"]) else f"{r[f'{k}_{s}']:.6g}")
                          for k in metric_keys for s in ("mean", "std")] + [" | ".join(r["errors"])])
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "status", "best_epoch"] + [f"f1_{t}" for t in tasks]
                   + ["average_f1", "hamming_score", "steps_per_s", "clips_per_s", "peak_rss_mb", "peak_device_mb",
                      "wall_s", "error"])
        for s in summaries:
            test = s.get("test") or {}
            f1 = test.get("f1", {})
            w.writerow([s["strategy"], s["seed"], s["status"], s.get("best_epoch", "")]
                       + [_num(f1.get(t)) for t in tasks]
                       + [_num(test.get("average_f1")), _num(test.get("hamming_score")), _num(s.get("steps_per_s")),
                          _num(s.get("clips_per_s")), _num(s.get("peak_rss_mb")), _num(s.get("peak_device_mb")),
                          _num(s.get("wall_s")), s.get("error") or ""])

    has_device = any(math.isfinite(r["peak_device_mb_mean"]) for r in rows)
    head = (["strategy", "runs ok"] + [f"F1 {t}" for t in tasks] + ["average F1", "hamming score", "steps/s",
                                                                     "clips/s", "peak RSS MB"]
            + (["peak device MB"] if has_device else []))
    lines = ["# Strategy sweep", "", f"Command: `{command}`", "",
             f"Test-split metrics of each run's best epoch (by validation `train.select_metric`), "
             f"mean ± std (ddof=1) over the seeds that finished.", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        star = "*" if r["rate_includes_compile"] else ""
        cells = [r["strategy"], f"{r['n_ok']}/{r['n_runs']}"]
        cells += [_fmt(r[f"f1_{t}_mean"], r[f"f1_{t}_std"], 3) for t in tasks]
        cells += [_fmt(r["average_f1_mean"], r["average_f1_std"], 3),
                  _fmt(r["hamming_score_mean"], r["hamming_score_std"], 3),
                  _fmt(r["steps_per_s_mean"], r["steps_per_s_std"], 2) + star,
                  _fmt(r["clips_per_s_mean"], r["clips_per_s_std"], 1) + star,
                  _fmt(r["peak_rss_mb_mean"], r["peak_rss_mb_std"], 0)]
        if has_device:
            cells.append(_fmt(r["peak_device_mb_mean"], r["peak_device_mb_std"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["rate_includes_compile"] for r in rows):
        lines += ["", "\\* single-epoch runs: the rate includes the first epoch's compilation."]
    failed = [s for s in summaries if s["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {s['strategy']} seed {s['seed']}: {s['error']}" for s in failed]
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _num(x: Any) -> str:
    if x is None:
        return ""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{v:.6g}" if math.isfinite(v) else ""


# ----------------------------------------------------------------------------- driver

def sweep(config: str | Path, strategies: Sequence[str], seeds: Sequence[int], out: str | Path, *,
          overrides: Sequence[str] = (), command: str | None = None, resume: bool = False,
          cache_dir: str | Path | None = "default") -> dict[str, Any]:
    out = Path(out)
    runs = plan_runs(config, strategies, seeds, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    command = command or ("python -m mtjax.sweep " + shlex.join(
        ["--config", str(config), "--strategies", ",".join(strategies), "--seeds", ",".join(map(str, seeds)),
         "--out", str(out), *overrides]))
    import jax

    (out / "COMMAND.txt").write_text(
        f"{command}\n\n# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"jax {jax.__version__} on {jax.default_backend()} ({platform.machine()}, {os.cpu_count()} CPUs)\n")
    cache = out / ".jax_cache" if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    t0 = time.perf_counter()
    summaries = []
    with compile_cache(cache):
        for strategy, seed, exp in runs:
            summaries.append(run_one(strategy, seed, exp, resume=resume))
    tasks = list(runs[0][2].tasks_if_known or _tasks_of(summaries))
    rows = aggregate(summaries, strategies, tasks)
    run_minutes = sum(s.get("wall_s") or 0.0 for s in summaries) / 60
    notes = [f"config `{config}`, seeds {', '.join(map(str, seeds))}; wall time of the runs "
             f"{run_minutes:.1f} min (this invocation {(time.perf_counter() - t0) / 60:.1f} min; reused runs "
             f"count with their original time) on {jax.default_backend()} ({os.cpu_count()} CPUs)",
             "steps/s: optimizer steps per second of wall time over each run's epochs after the first "
             "(the first includes compilation); clips/s: real (unpadded) rows per second over the same epochs, "
             "as the trainer counts them (a round_robin batch counts once per task step; a "
             "dynamic_difficulty_sampling step holds up to B + 2T rows)",
             "peak RSS: the process's resident-set high-water mark, reset before each run "
             "(/proc/self/clear_refs) so it is per run" if all(s.get("peak_rss_per_run") for s in summaries)
             else "peak RSS: resource.getrusage ru_maxrss, the process-wide peak so far (not per run)"]
    md, csv_path = write_tables(out, rows, summaries, tasks, command=command, notes=notes)
    plots: list[str] = []
    finished = {s: [x["run_dir"] for x in summaries if x["strategy"] == s and x["status"] == "ok"]
                for s in strategies}
    finished = {k: v for k, v in finished.items() if v}
    if finished:
        from mtjax.plot import plot_comparison

        plots = [str(p) for p in plot_comparison(finished, out)]
    else:
        print("sweep: no run finished; no comparison plots", file=sys.stderr)
    return {"results_md": str(md), "results_csv": str(csv_path), "plots": plots, "rows": rows,
            "runs": summaries}


def _tasks_of(summaries) -> list[str]:
    for s in summaries:
        if s.get("test"):
            return list(s["test"]["f1"])
    return []


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"strategy names: {known_strategies()}")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--strategies", required=True, help="comma-separated; name or name+name")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--out", help="output directory (default runs/sweep-<config name>)")
    p.add_argument("--resume", action="store_true", help="reuse runs that already finished with the same experiment")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile every run afresh (default: a persistent cache in OUT/.jax_cache)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    command = "python -m mtjax.sweep " + shlex.join(raw)
    try:
        out = args.out or f"runs/sweep-{Path(args.config).stem}"
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        result = sweep(args.config, strategies, args.seeds, out, overrides=args.overrides, command=command,
                       resume=args.resume, cache_dir=None if args.no_compile_cache else "default")
    except (SweepError, ConfigError) as e:
        print(f"mtjax.sweep: error: {e}", file=sys.stderr)
        return 2
    print(Path(result["results_md"]).read_text())
    for path in result["plots"]:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

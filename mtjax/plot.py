"""Training plots from a run directory's ``metrics.jsonl`` (see docs/ARCHITECTURE.md).

CLI: ``python -m mtjax.plot RUN_DIR [--out DIR]`` writes, into DIR (default RUN_DIR):
  loss.png            total and per-task training loss vs step (raw faint, EMA-smoothed solid)
  val_metrics.png     validation average F1, hamming score and per-task F1 per epoch
  loss_weights.png    loss weight per task vs step          (when step records carry it)
  lr.png              learning rate vs step                  (when step records carry it)
  sample_weights.png  sampling weight per task vs step       (when step records carry it)
A plot whose fields are absent is skipped with a note on stderr; the written paths are
printed on stdout. ``plot_run`` is the same as a function (the trainer calls it at the end);
``plot_comparison`` overlays several strategies (and seeds) for the sweep runner.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
pyplot, so plotting leaves no global state behind and needs no display.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["load_metrics", "plot_run", "plot_comparison", "main"]

METRICS_FILE = "metrics.jsonl"


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- reading
def _metrics_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / METRICS_FILE


def load_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Read ``RUN_DIR/metrics.jsonl`` (or a path to the file itself) → (step records, epoch records).

    Step records are sorted by step, epoch records kept in file order. Lines that are not a JSON
    object (e.g. a half-written last line of a run still going) are skipped with a note.
    Raises FileNotFoundError / ValueError naming the path when the file is missing or has no record.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    steps: list[dict] = []
    epochs: list[dict] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                _note(f"{path}:{lineno}: not valid JSON, skipped")
                continue
            if not isinstance(rec, dict):
                _note(f"{path}:{lineno}: not a JSON object, skipped")
                continue
            kind = rec.get("kind")
            if kind == "step":
                steps.append(rec)
            elif kind == "epoch":
                epochs.append(rec)
            # other kinds (future additions) are ignored on purpose
    if not steps and not epochs:
        raise ValueError(f"metrics file has no step or epoch records: {path}")
    steps.sort(key=lambda r: _num(r.get("step"), default=math.inf))
    return steps, epochs


def _num(v: Any, default: float = math.nan) -> float:
    """A float for plotting: None, non-numbers and ±inf become ``default`` (NaN → gap in the line)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return default
    v = float(v)
    return v if math.isfinite(v) else default


def _tasks_in(dicts: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        if isinstance(d, Mapping):
            for k in d:
                seen.setdefault(str(k), None)
    return list(seen)


def _step_x(steps: Sequence[dict]) -> np.ndarray:
    x = np.array([_num(r.get("step")) for r in steps])
    # records without a step number fall back to their position
    return np.where(np.isnan(x), np.arange(len(steps), dtype=float), x)


def _epoch_x(epochs: Sequence[dict]) -> tuple[np.ndarray, str]:
    x = np.array([_num(r.get("epoch")) for r in epochs])
    # epoch numbers that repeat or go back (e.g. one_at_a_time restarting per task) would fold
    # the curve onto itself: plot in record order then
    if len(x) and not np.isnan(x).any() and np.all(np.diff(x) > 0):
        return x, "epoch"
    return np.arange(1, len(epochs) + 1, dtype=float), "evaluation #"


def _field_series(steps: Sequence[dict], field: str) -> np.ndarray:
    return np.array([_num(r.get(field)) for r in steps])


def _dict_series(records: Sequence[dict], field: str) -> dict[str, np.ndarray]:
    """{task: values} from a per-task dict field; NaN where a record lacks the task."""
    tasks = _tasks_in(r.get(field) for r in records)
    out = {}
    for t in tasks:
        vals = []
        for r in records:
            d = r.get(field)
            vals.append(_num(d.get(t)) if isinstance(d, Mapping) else math.nan)
        out[t] = np.array(vals)
    return out


def _val_series(epochs: Sequence[dict], key: str, split: str = "val") -> np.ndarray:
    return np.array([_num(r.get(split, {}).get(key)) if isinstance(r.get(split), Mapping) else math.nan
                     for r in epochs])


def _val_task_f1(epochs: Sequence[dict], split: str = "val") -> dict[str, np.ndarray]:
    per = [r.get(split, {}).get("per_task") if isinstance(r.get(split), Mapping) else None for r in epochs]
    tasks = _tasks_in(per)
    out = {}
    for t in tasks:
        out[t] = np.array([_num(p[t].get("f1")) if isinstance(p, Mapping) and isinstance(p.get(t), Mapping)
                           else math.nan for p in per])
    return out


def _has_data(arr: np.ndarray) -> bool:
    return bool(arr.size) and bool(np.isfinite(arr).any())


# ----------------------------------------------------------------------------- drawing helpers
def ema(y: np.ndarray, span: int | None = None) -> np.ndarray:
    """Debiased exponential moving average that steps over NaNs (they stay NaN in the output).

    ``span`` defaults to ~2% of the points (at least 1, at most 100): light smoothing that keeps
    the shape of the curve while taking the per-batch noise off.
    """
    y = np.asarray(y, dtype=float)
    n_valid = int(np.isfinite(y).sum())
    if span is None:
        span = int(min(100, max(1, n_valid // 50)))
    if span <= 1:
        return y.copy()
    a = 2.0 / (span + 1.0)
    out = np.full_like(y, np.nan)
    m, w = 0.0, 0.0
    for i, v in enumerate(y):
        if math.isfinite(v):
            m = (1 - a) * m + a * v
            w = (1 - a) * w + a  # debias: early points are not pulled towards 0
            out[i] = m / w
    return out


def _colors(n: int) -> list:
    cmap = colormaps["tab10"] if n <= 10 else colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _new_fig(nrows: int = 1, ncols: int = 1, width: float = 7.5, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _plot_raw_and_smooth(ax, x: np.ndarray, y: np.ndarray, color, label: str) -> None:
    ok = np.isfinite(y)
    # gaps (NaN) would break a line into single points: draw the finite points only
    ax.plot(x[ok], y[ok], color=color, alpha=0.25, linewidth=0.8)
    ax.plot(x[ok], ema(y[ok]), color=color, linewidth=1.6, label=label)


def _maybe_log(ax, ys: Iterable[np.ndarray]) -> None:
    vals = np.concatenate([np.asarray(y, float)[np.isfinite(y)] for y in ys] or [np.array([])])
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 20:
        ax.set_yscale("log")


# ----------------------------------------------------------------------------- single run
def _plot_loss(steps, out: Path) -> Path | None:
    x = _step_x(steps)
    total = _field_series(steps, "loss")
    per = {t: v for t, v in _dict_series(steps, "task_losses").items() if _has_data(v)}
    if not _has_data(total) and not per:
        _note("no training loss in step records; loss.png skipped")
        return None
    fig, axes = _new_fig(2 if per else 1, 1)
    ax = axes[0]
    if _has_data(total):
        _plot_raw_and_smooth(ax, x, total, "black", "total")
    ax.set_title("training loss (total)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if per:
        ax = axes[1]
        for c, (t, y) in zip(_colors(len(per)), per.items()):
            _plot_raw_and_smooth(ax, x, y, c, t)
        ax.set_title("training loss per task")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=min(5, len(per)))
    return _save(fig, out / "loss.png")


def _plot_val(epochs, out: Path) -> Path | None:
    if not epochs:
        _note("no epoch records; val_metrics.png skipped")
        return None
    x, xlabel = _epoch_x(epochs)
    avg = _val_series(epochs, "average_f1")
    ham = _val_series(epochs, "hamming_score")
    train_avg = _val_series(epochs, "average_f1", split="train")
    per = {t: v for t, v in _val_task_f1(epochs).items() if _has_data(v)}
    if not (_has_data(avg) or _has_data(ham) or per):
        _note("epoch records carry no validation metrics; val_metrics.png skipped")
        return None
    fig, axes = _new_fig(2 if per else 1, 1)
    ax = axes[0]
    for y, style, label in ((avg, "o-", "val average F1"), (ham, "s-", "val hamming score"),
                            (train_avg, "o--", "train average F1")):
        if _has_data(y):
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], style, markersize=3, label=label)
    if _has_data(avg):
        best = int(np.nanargmax(avg))
        ax.axvline(x[best], color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"best {avg[best]:.3f}", (x[best], avg[best]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_title("validation (summary)")
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if per:
        ax = axes[1]
        for c, (t, y) in zip(_colors(len(per)), per.items()):
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], "o-", color=c, markersize=3, label=t)
        ax.set_title("validation F1 per task")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("F1")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=min(5, len(per)))
    return _save(fig, out / "val_metrics.png")


def _plot_task_dict(steps, field: str, title: str, ylabel: str, out: Path, name: str) -> Path | None:
    per = {t: v for t, v in _dict_series(steps, field).items() if _has_data(v)}
    if not per:
        _note(f"no '{field}' in step records; {name} skipped")
        return None
    x = _step_x(steps)
    fig, axes = _new_fig(1, 1)
    ax = axes[0]
    for c, (t, y) in zip(_colors(len(per)), per.items()):
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], color=c, linewidth=1.3, label=t)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(5, len(per)))
    return _save(fig, out / name)


def _plot_lr(steps, out: Path) -> Path | None:
    lr = _field_series(steps, "lr")
    if not _has_data(lr):
        _note("no 'lr' in step records; lr.png skipped")
        return None
    x = _step_x(steps)
    fig, axes = _new_fig(1, 1, height=3.0)
    ax = axes[0]
    ok = np.isfinite(lr)
    ax.plot(x[ok], lr[ok], color="tab:blue")
    _maybe_log(ax, [lr])
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    ax.grid(alpha=0.3)
    return _save(fig, out / "lr.png")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's plots into ``out_dir`` (default: the run directory); return their paths."""
    steps, epochs = load_metrics(run_dir)
    run_path = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else (run_path.parent if run_path.is_file() else run_path)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_loss(steps, out),
        _plot_val(epochs, out),
        _plot_task_dict(steps, "loss_weights", "loss weights", "weight", out, "loss_weights.png"),
        _plot_lr(steps, out),
        _plot_task_dict(steps, "sample_weights", "sampling weights", "weight", out, "sample_weights.png"),
    ]
    return [p for p in written if p is not None]


# ----------------------------------------------------------------------------- comparison
def _mean_band(curves: list[tuple[np.ndarray, np.ndarray]], interpolate: bool) -> tuple[np.ndarray, ...]:
    """Mean and ±1 std (ddof=1; 0 for one run) of several (x, y) curves on the union of their x.

    ``interpolate``: for step curves (seeds may log at different steps) each run is linearly
    interpolated inside its own x range; epoch curves are matched exactly. Where only some runs
    reach an x (early stopping), the mean is over those.
    """
    grid = np.unique(np.concatenate([x[np.isfinite(y)] for x, y in curves]))
    rows = []
    for x, y in curves:
        ok = np.isfinite(y)
        xs, ys = x[ok], y[ok]
        row = np.full(grid.shape, np.nan)
        if xs.size:
            if interpolate:
                order = np.argsort(xs, kind="stable")
                xs, ys = xs[order], ys[order]
                inside = (grid >= xs[0]) & (grid <= xs[-1])
                row[inside] = np.interp(grid[inside], xs, ys)
            else:
                idx = np.searchsorted(grid, xs)
                row[idx] = ys
        rows.append(row)
    m = np.stack(rows)
    n = np.isfinite(m).sum(axis=0)
    with warnings.catch_warnings():
        # columns reached by a single run give "degrees of freedom <= 0": their band is 0 below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(m, axis=0)
        std = np.nanstd(m, axis=0, ddof=1)
    return grid, mean, np.where(n > 1, np.nan_to_num(std), 0.0), n


def _draw_mean_band(ax, curves, color, label, interpolate: bool, marker: str | None = None) -> None:
    grid, mean, std, _ = _mean_band(curves, interpolate)
    n_runs = len(curves)
    lab = f"{label} (n={n_runs})" if n_runs > 1 else label
    ax.plot(grid, mean, color=color, linewidth=1.6, label=lab, marker=marker, markersize=3)
    if n_runs > 1:
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def plot_comparison(
    runs: Mapping[str, str | Path | Sequence[str | Path]],
    out_dir: str | Path,
) -> list[Path]:
    """Overlay strategies: ``runs`` maps a label to one run dir or a list of run dirs (seeds).

    Writes into ``out_dir``:
      compare_val_f1.png          validation average F1 per epoch, mean ± 1 std over seeds
      compare_val_task_f1.png     validation F1 per task per epoch, same bands
      compare_loss_weights.png    loss weight per task vs step, one line per strategy
      compare_sample_weights.png  sampling weight per task vs step, one line per strategy
    The weight plots are skipped (with a note) when no run records the field; a run dir whose
    metrics file is missing or empty is skipped with a note. Raises ValueError when no run at
    all could be read. Returns the written paths.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty dict label -> run dir or list of run dirs")
    loaded: dict[str, list[tuple[list[dict], list[dict]]]] = {}
    for label, dirs in runs.items():
        dir_list = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        for d in dir_list:
            try:
                loaded.setdefault(str(label), []).append(load_metrics(d))
            except (FileNotFoundError, ValueError) as e:
                _note(f"{label}: {e}; run skipped")
    loaded = {k: v for k, v in loaded.items() if v}
    if not loaded:
        raise ValueError(f"no readable {METRICS_FILE} among the runs: {dict(runs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(loaded, _colors(len(loaded))))
    written: list[Path] = []

    # validation average F1
    fig, axes = _new_fig(1, 1)
    ax = axes[0]
    drawn = False
    for label, rs in loaded.items():
        curves = []
        for _, epochs in rs:
            x, _ = _epoch_x(epochs)
            y = _val_series(epochs, "average_f1")
            if _has_data(y):
                curves.append((x, y))
        if curves:
            _draw_mean_band(ax, curves, colors[label], label, interpolate=False, marker="o")
            drawn = True
    if drawn:
        ax.set_title("validation average F1 (mean ± 1 std over seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("average F1")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "compare_val_f1.png"))
    else:
        _note("no run has validation average_f1; compare_val_f1.png skipped")

    # validation F1 per task
    tasks = _tasks_in(_val_task_f1(ep) for rs in loaded.values() for _, ep in rs)
    if tasks:
        fig, axes = _new_fig(len(tasks), 1, height=2.6)
        for ax, t in zip(axes, tasks):
            for label, rs in loaded.items():
                curves = []
                for _, epochs in rs:
                    y = _val_task_f1(epochs).get(t)
                    if y is not None and _has_data(y):
                        curves.append((_epoch_x(epochs)[0], y))
                if curves:
                    _draw_mean_band(ax, curves, colors[label], label, interpolate=False, marker="o")
            ax.set_title(f"validation F1: {t}")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("epoch")
        axes[0].legend(fontsize=8)
        written.append(_save(fig, out / "compare_val_task_f1.png"))
    else:
        _note("no run has per-task validation F1; compare_val_task_f1.png skipped")

    # weight histories
    for field, name, title in (("loss_weights", "compare_loss_weights.png", "loss weight"),
                               ("sample_weights", "compare_sample_weights.png", "sampling weight")):
        per_label = {}
        for label, rs in loaded.items():
            series = [(_step_x(steps), _dict_series(steps, field)) for steps, _ in rs]
            if any(_has_data(v) for _, s in series for v in s.values()):
                per_label[label] = series
        if not per_label:
            _note(f"no run records '{field}'; {name} skipped")
            continue
        tasks = _tasks_in(s for series in per_label.values() for _, s in series)
        fig, axes = _new_fig(len(tasks), 1, height=2.4)
        for ax, t in zip(axes, tasks):
            for label, series in per_label.items():
                curves = [(x, s[t]) for x, s in series if t in s and _has_data(s[t])]
                if curves:
                    _draw_mean_band(ax, curves, colors[label], label, interpolate=True)
            ax.set_title(f"{title}: {t}")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        axes[0].legend(fontsize=8)
        written.append(_save(fig, out / name))
    return written


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtjax.plot",
                                 description="Plot a training run from RUN_DIR/metrics.jsonl.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    ap.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default RUN_DIR)")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

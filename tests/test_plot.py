"""mtjax.plot on synthetic metrics.jsonl files (format of docs/ARCHITECTURE.md)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtjax.plot import load_metrics, plot_comparison, plot_run

TASKS = ["binary", "mature", "gory", "slapstick", "sarcasm"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _write_run(run_dir: Path, *, seed=0, epochs=4, steps_per_epoch=25, loss_weights=True,
               sample_weights=False, lr=True, junk_last_line=False) -> Path:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    step = 0
    for ep in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            tl = {t: float(0.7 * np.exp(-step / 60) + 0.05 * rng.random()) for t in TASKS}
            rec = {"kind": "step", "step": step, "epoch": ep, "loss": sum(tl.values()),
                   "task_losses": tl, "clips_per_s": 100.0}
            if loss_weights:
                w = rng.dirichlet(np.ones(len(TASKS))) * len(TASKS)
                rec["loss_weights"] = dict(zip(TASKS, map(float, w)))
            if lr:
                rec["lr"] = 2e-5 * (0.5 ** (ep // 2))
            if sample_weights:
                rec["sample_weights"] = dict(zip(TASKS, map(float, rng.dirichlet(np.ones(len(TASKS))))))
            recs.append(rec)
        per_task = {t: {"accuracy": float(rng.random()), "f1": float(min(1, 0.3 + 0.1 * ep + 0.05 * rng.random())),
                        "macro_f1": 0.5, "weighted_f1": 0.5, "confusion_matrix": [[1, 2], [3, 4]],
                        "support": 10} for t in TASKS}
        val = {"average_f1": float(np.mean([v["f1"] for v in per_task.values()])), "average_macro_f1": 0.5,
               "hamming_score": 0.5 + 0.05 * ep, "hamming_loss": 0.5 - 0.05 * ep, "exact_match": 0.2,
               "per_task": per_task}
        recs.append({"kind": "epoch", "epoch": ep, "step": step, "train": {"average_f1": 0.4 + 0.1 * ep},
                     "val": val})
    path = run_dir / "metrics.jsonl"
    text = "\n".join(json.dumps(r) for r in recs) + "\n"
    if junk_last_line:
        text += '{"kind": "step", "step": 10'  # a half-written line of a run still going
    path.write_text(text)
    return run_dir


def _assert_png(path: Path, min_bytes=5_000):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))


def test_plot_run_writes_all(tmp_path):
    run = _write_run(tmp_path / "run", sample_weights=True)
    paths = plot_run(run)
    names = sorted(p.name for p in paths)
    assert names == sorted(["loss.png", "val_metrics.png", "loss_weights.png", "lr.png", "sample_weights.png"])
    for p in paths:
        assert p.parent == run
        _assert_png(p)


def test_plot_run_out_dir_and_skips(tmp_path, capsys):
    run = _write_run(tmp_path / "run", loss_weights=False, lr=False)
    out = tmp_path / "figs" / "nested"
    paths = plot_run(run, out)
    assert sorted(p.name for p in paths) == ["loss.png", "val_metrics.png"]
    assert all(p.parent == out for p in paths)
    assert not (out / "loss_weights.png").exists()
    assert not (out / "sample_weights.png").exists()
    err = capsys.readouterr().err
    assert "loss_weights" in err and "lr.png skipped" in err and "sample_weights" in err


def test_plot_run_tolerates_partial_records(tmp_path, capsys):
    # round-robin style records (one task per step), a NaN loss, no epoch records, a junk last line
    run = tmp_path / "rr"
    run.mkdir()
    lines = []
    for s in range(1, 61):
        t = TASKS[s % len(TASKS)]
        lines.append(json.dumps({"kind": "step", "step": s, "epoch": 1,
                                 "loss": float("nan") if s == 30 else 1.0 / s,
                                 "task_losses": {t: 1.0 / s}, "lr": None}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{oops\n")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png"]
    _assert_png(paths[0])
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "val_metrics.png skipped" in err


def test_cli(tmp_path):
    run = _write_run(tmp_path / "run", junk_last_line=True)
    out = tmp_path / "cli_out"
    r = subprocess.run([sys.executable, "-m", "mtjax.plot", str(run), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    printed = [Path(line) for line in r.stdout.split()]
    assert sorted(p.name for p in printed) == ["loss.png", "loss_weights.png", "lr.png", "val_metrics.png"]
    for p in printed:
        _assert_png(p)
    assert "sample_weights" in r.stderr  # the skipped plot is noted, not an error


def test_cli_missing_file_names_path(tmp_path):
    missing = tmp_path / "no_such_run"
    r = subprocess.run([sys.executable, "-m", "mtjax.plot", str(missing)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert str(missing / "metrics.jsonl") in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_and_empty_file_errors_name_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics file not found") as e:
        plot_run(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "metrics.jsonl") in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(ValueError) as e:
        plot_run(empty)
    assert str(empty / "metrics.jsonl") in str(e.value)


def test_load_metrics_sorts_steps(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    recs = [{"kind": "step", "step": s, "loss": 1.0} for s in (3, 1, 2)] + [{"kind": "epoch", "epoch": 1}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)))
    steps, epochs = load_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3] and len(epochs) == 1
    # the file itself is accepted too
    assert load_metrics(run / "metrics.jsonl")[0] == steps


def test_plot_comparison(tmp_path, capsys):
    runs = {
        "unweighted": [_write_run(tmp_path / f"uw{s}", seed=s) for s in range(3)],
        "dds": [_write_run(tmp_path / f"dds{s}", seed=10 + s, epochs=3 + s, sample_weights=True,
                           loss_weights=False) for s in range(2)],
        "pcgrad": _write_run(tmp_path / "pc", seed=20),  # a single run dir, not a list
        "broken": [tmp_path / "missing_run"],
    }
    out = tmp_path / "cmp"
    paths = plot_comparison(runs, out)
    assert sorted(p.name for p in paths) == sorted(
        ["compare_val_f1.png", "compare_val_task_f1.png", "compare_loss_weights.png",
         "compare_sample_weights.png"])
    for p in paths:
        assert p.parent == out
        _assert_png(p)
    assert "missing_run" in capsys.readouterr().err


def test_plot_comparison_skips_absent_weights(tmp_path):
    runs = {"a": [_write_run(tmp_path / "a", loss_weights=False)],
            "b": [_write_run(tmp_path / "b", loss_weights=False)]}
    names = sorted(p.name for p in plot_comparison(runs, tmp_path / "cmp"))
    assert names == ["compare_val_f1.png", "compare_val_task_f1.png"]


def test_plot_comparison_nothing_readable(tmp_path):
    with pytest.raises(ValueError, match="no readable metrics.jsonl"):
        plot_comparison({"x": [tmp_path / "nope"]}, tmp_path / "cmp")

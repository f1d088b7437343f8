"""mtjax.sweep: strategy names, aggregation, and a tiny real sweep (2 strategies x 2 seeds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests._support import TINY_EXPERIMENT
from mtjax.sweep import SweepError, aggregate, main, plan_runs, strategy_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from mtjax.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("sweep")
    make_synthetic_dataset(root / "data", 50, seed=0, video_dim=8, audio_dim=6, video_frames_max=6,
                           audio_frames_max=6, max_sentences=2)
    path = root / "tiny.yaml"
    path.write_text(TINY_EXPERIMENT.format(out="unused", data=root / "data", epochs=2))
    return path


def test_strategy_names_map_to_overrides():
    assert strategy_overrides("dsg") == ["strategy.schedule=dsg"]
    assert strategy_overrides("gradnorm") == ["loss.weighting=gradnorm"]
    assert strategy_overrides("pcgrad") == ["strategy.aggregator=pcgrad"]
    assert strategy_overrides("dsg+pcgrad") == ["strategy.schedule=dsg", "strategy.aggregator=pcgrad"]
    with pytest.raises(SweepError, match="strategy.schedule twice"):
        strategy_overrides("dsg+round_robin")


def test_unknown_strategy_is_a_clear_error_listing_the_known_names(config, tmp_path, capsys):
    with pytest.raises(SweepError) as e:
        strategy_overrides("dsg+gradsurgery")
    text = str(e.value)
    assert "'gradsurgery'" in text
    for name in ("all_at_once", "dynamic_difficulty_sampling", "dsg", "gradnorm", "uncertainty", "pcgrad"):
        assert name in text
    rc = main(["--config", str(config), "--strategies", "all_at_once,nope", "--seeds", "0", "--out",
               str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and "round_robin" in err and "pcgrad" in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_plan_refuses_a_learnable_weighting_with_an_aggregator(config, tmp_path):
    with pytest.raises(SweepError, match="uncertainty"):
        plan_runs(config, ["uncertainty+pcgrad"], [0], tmp_path)
    runs = plan_runs(config, ["dsg+pcgrad"], [0, 3], tmp_path, ["train.epochs=1"])
    assert [(s, k) for s, k, _ in runs] == [("dsg+pcgrad", 0), ("dsg+pcgrad", 3)]
    exp = runs[1][2]
    assert (exp.seed, exp.strategy.schedule, exp.strategy.aggregator, exp.train.epochs) == (3, "dsg", "pcgrad", 1)
    assert exp.output_dir == str(tmp_path / "dsg+pcgrad" / "seed3")


def test_aggregate_mean_std_over_finished_seeds():
    def run(strategy, seed, f1, status="ok"):
        test = {"average_f1": f1, "hamming_score": 0.5, "f1": {"binary": f1}} if status == "ok" else None
        return {"strategy": strategy, "seed": seed, "status": status, "test": test, "steps_per_s": 2.0,
                "clips_per_s": 10.0, "peak_rss_mb": 100.0, "peak_device_mb": None,
                "error": None if status == "ok" else "TrainingStopped: boom"}

    rows = aggregate([run("a", 0, 0.2), run("a", 1, 0.4), run("a", 2, 0.9, "failed"), run("b", 0, 0.5)],
                     ["a", "b"], ["binary"])
    a, b = rows
    assert (a["n_runs"], a["n_ok"], a["n_failed"]) == (3, 2, 1)
    assert a["average_f1_mean"] == pytest.approx(0.3) and a["average_f1_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert a["errors"] == ["TrainingStopped: boom"]
    assert b["average_f1_std"] == 0.0 and np.isnan(b["peak_device_mb_mean"])


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_sweep_writes_table_csv_plots_and_command(config, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", str(config), "--strategies", "all_at_once,dsg", "--seeds", "0,1", "--out", str(out),
            "train.epochs=1"]
    assert main(argv) == 0
    rows = _read_csv(out / "results.csv")
    assert [r["strategy"] for r in rows] == ["all_at_once", "dsg"]
    runs = _read_csv(out / "runs.csv")
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    for r in rows:
        assert (r["n_runs"], r["n_ok"], r["n_failed"]) == ("2", "2", "0")
        for key in ("f1_binary", "f1_mature", "f1_gory", "average_f1", "hamming_score", "steps_per_s",
                    "clips_per_s", "peak_rss_mb"):
            assert r[f"{key}_mean"] != "" and r[f"{key}_std"] != "", key
        seeds = [float(x["average_f1"]) for x in runs if x["strategy"] == r["strategy"]]
        assert float(r["average_f1_mean"]) == pytest.approx(np.mean(seeds), abs=1e-5)
        assert float(r["average_f1_std"]) == pytest.approx(np.std(seeds, ddof=1), abs=1e-5)
        assert float(r["steps_per_s_mean"]) > 0 and float(r["peak_rss_mb_mean"]) > 10
    md = (out / "results.md").read_text()
    assert "| all_at_once | 2/2 |" in md and "| dsg | 2/2 |" in md and "±" in md
    for name in ("compare_val_f1.png", "compare_val_task_f1.png", "compare_loss_weights.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    command = (out / "COMMAND.txt").read_text().splitlines()[0]
    assert command.startswith("python -m mtjax.sweep ") and "--strategies all_at_once,dsg" in command
    assert command.endswith("train.epochs=1")
    summary = json.loads((out / "dsg" / "seed1" / "sweep_run.json").read_text())
    assert summary["experiment"]["seed"] == 1 and summary["experiment"]["strategy"]["schedule"] == "dsg"

    # --resume reuses finished runs instead of training them again.
    assert main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 4


def test_a_failed_run_is_recorded_not_raised(config, tmp_path):
    out = tmp_path / "sweep"
    # one_at_a_time cannot spread 3 tasks over 1 epoch: the run fails when the Trainer is built.
    assert main(["--config", str(config), "--strategies", "one_at_a_time", "--seeds", "0", "--out", str(out),
                 "train.epochs=1", "--no-compile-cache"]) == 0
    (row,) = _read_csv(out / "results.csv")
    assert (row["n_ok"], row["n_failed"]) == ("0", "1") and "fewer than the 3 tasks" in row["errors"]
    assert "## Failed runs" in (out / "results.md").read_text()
    assert (out / "one_at_a_time" / "seed0" / "sweep_error.txt").is_file()

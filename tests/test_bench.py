"""`python -m mtjax.bench`: the CPU smoke run end to end, and the table/FLOP arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtjax.bench import build_plan, format_table, median_time, model_flops_per_clip, parse_mode, step_flops, table_rows
from mtjax.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE_MODES = ["jax-train-fp32", "jax-eval-fp32", "torch-train-fp32", "torch-eval-fp32"]


def test_full_size_flops_match_the_issue_estimate():
    config = ModelConfig()
    fwd = model_flops_per_clip(config)
    # BERT-base over 500 tokens: 12 layers x (24·d²·L + 4·L²·d) ≈ 9.4e10 of the ~1.0e11.
    bert = 12 * (24 * 768**2 * 500 + 4 * 500**2 * 768)
    assert bert < fwd < 1.1 * bert
    # The issue: "about 5 TFLOP at batch 16" for a train step (forward + backward).
    assert 4.5e12 < step_flops(config, "train", 16) < 5.5e12
    assert step_flops(config, "eval", 16) == pytest.approx(step_flops(config, "train", 16) / 3)


def test_timing_queues_steps_back_to_back_and_reports_time_per_step(monkeypatch):
    """A sample dispatches `per_sample` steps, then waits once; the time is per step."""
    import mtjax.bench as bench

    clock, events = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def dispatch():
        events.append("d")
        clock[0] += 1.0  # host time per dispatch

    def sync():
        events.append("s")
        clock[0] += 7.0  # the last step's remaining device time

    med, times = median_time(dispatch, sync, warmup=1, samples=2, per_sample=5)
    assert events == ["d", "s"] + (["d"] * 5 + ["s"]) * 2
    assert times == [12.0 / 5] * 2 and med == 12.0 / 5


def test_modes_are_validated():
    assert parse_mode("jax-train-bf16") == ("jax", "train", "bf16")
    assert parse_mode("torch-train-compile") == ("torch", "train", "compile")
    for bad in ("jax-train-compile", "torch-pcgrad-fp32", "jax-train", "tf-train-fp32"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    assert build_plan(["jax-eval-bf16"], [8, 32], smoke=False) == [("jax-eval-bf16", 8, {}), ("jax-eval-bf16", 32, {})]


def test_ratios_and_notes():
    def rec(impl, kind, prec, ms, batch=16, **extra):
        return {"impl": impl, "mode": f"{impl}-{kind}-{prec}", "kind": kind, "precision": prec, "batch": batch,
                "ms": ms, "clips_per_s": batch / (ms / 1e3), "peak_bytes": 1e9, "mfu": 0.1, "model": {},
                "device": "gpu:test", **extra}

    records = [rec("torch", "train", "fp32", 150.0), rec("jax", "train", "fp32", 100.0),
               rec("jax", "pcgrad", "fp32", 180.0), rec("jax", "train", "bf16", 50.0),
               {**rec("jax", "eval", "bf16", 1.0), "error": "boom", "ms": None, "clips_per_s": None}]
    rows = {r["mode"]: r for r in table_rows(records)}
    assert rows["jax-train-fp32"]["ratio"] == pytest.approx(1.5)
    assert rows["jax-pcgrad-fp32"]["ratio"] is None            # PyTorch's per-task step not run
    assert rows["jax-pcgrad-fp32"]["note"] == "PCGrad on parameters; 1.80x the single-loss step's time"
    assert rows["jax-train-bf16"]["ratio"] is None              # no PyTorch bf16 row to compare
    assert rows["jax-eval-bf16"]["note"] == "boom"
    assert "| jax | jax-train-fp32 | 16 | 100.0 | 160 | 1.00 | 10.0% | 1.50 |" in format_table(records)
    # The optimizer settings a row ran with are in its note (records from before the
    # mu_dtype setting have none: float32).
    bf16_mu = table_rows([rec("jax", "train", "bf16", 30.0, mu_dtype="bfloat16", pack_small_arrays=True)])[0]
    assert bf16_mu["note"] == "optim.pack_small_arrays; optim.mu_dtype=bfloat16"
    assert "mu_dtype" not in rows["jax-train-bf16"]["note"]


def test_parallel_and_feature_level_rows():
    def rec(kind, ms, batch, devices=None, **extra):
        return {"impl": "jax", "mode": f"jax-{kind}-bf16", "kind": kind, "precision": "bf16", "batch": batch,
                "ms": ms, "clips_per_s": batch / (ms / 1e3), "peak_bytes": 1e9, "mfu": 0.1, "model": {},
                "device": "gpu:test", "devices": devices, **extra}

    check = {"devices": 2, "per_device_batch": 32, "single_device_loss": 0.5, "mesh_loss": 0.5,
             "single_device_grad_norm": 2.0, "mesh_grad_norm": 2.002, "max_abs_param_diff": 1e-5}
    records = [rec("train", 50.0, 32), rec("train", 50.0, 16), rec("pcgradfeat", 60.0, 16),
               rec("train", 54.0, 64, devices=2, parallel=check),
               {**rec("torch", 100.0, 64), "impl": "torch", "mode": "torch-train-bf16", "kind": "train"}]
    rows = table_rows(records)
    feat = rows[2]["note"]
    assert feat.startswith("PCGrad on features") and "1.20x the single-loss" in feat
    dp = rows[3]
    assert dp["ratio"] is None                       # PyTorch ran on one GPU: no like-for-like ratio
    assert "2 devices, 32 per device" in dp["note"]
    assert f"{(64 / 0.054) / (32 / 0.050):.2f}x one device's clips/s" in dp["note"]
    assert "grad norm rel. diff 1.0e-03" in dp["note"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, "-m", "mtjax.bench", "--cpu-smoke", "--modes", ",".join(SMOKE_MODES),
           "--batch-sizes", "2", "--json", str(out / "r.jsonl"), "--out", str(out / "table.md")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
    return proc.stdout, (out / "table.md").read_text(), records


@pytest.mark.slow
def test_cpu_smoke_table_has_every_row_with_positive_numbers(smoke):
    stdout, table, records = smoke
    assert table.strip() in stdout
    assert [r["mode"] for r in records] == SMOKE_MODES
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["ms"] > 0 and r["clips_per_s"] > 0 and r["batch"] == 2
        assert r["device"].startswith("cpu")
    rows = {r["mode"]: r for r in table_rows(records)}
    for mode in ("jax-train-fp32", "jax-eval-fp32"):
        assert rows[mode]["ratio"] > 0           # compared with the PyTorch row of its kind
        line = next(ln for ln in table.splitlines() if f"| {mode} | 2 |" in ln)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0   # ms/step, clips/s
    # A JAX train step's loss is finite and a plain float in the record.
    assert all(0 < r["loss"] < 10 for r in records if r["mode"].endswith("train-fp32"))


@pytest.mark.slow
def test_merge_rebuilds_the_table_from_saved_records(smoke, tmp_path):
    _, table, records = smoke
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, "-m", "mtjax.bench", "--merge", str(path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == table.strip()

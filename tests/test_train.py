"""The training engine end to end: it learns, resumes exactly, survives a crash mid-save,
skips and reports non-finite steps, refuses bad configs in one line, and its evaluate
CLI reproduces the run's test numbers.

Time is spent compiling, not training (a few hundred clip-steps per run): every run here
uses one model config, and a module-scoped persistent compilation cache lets each later
Trainer (and the evaluate subprocess) load the executables the first run compiled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from mtjax import train as train_mod
from mtjax.checkpoint import load_model, save_model
from mtjax.config import ModelConfig
from mtjax.data import split_paths
from mtjax.experiment import ExperimentConfig
from mtjax.losses import l2_norm_sum
from mtjax.metrics import majority_baseline
from mtjax.run_checkpoints import RunCheckpointer

REPO = Path(__file__).resolve().parents[1]
TASKS = ["binary", "mature", "gory", "slapstick", "sarcasm"]
MODEL = {
    "bert": {"vocab_size": 30522, "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 96, "max_position_embeddings": 64},
    "text_len": 32, "video_len": 8, "audio_len": 8, "video_dim": 20, "audio_dim": 12,
    "lstm_hidden": 16, "lstm_layers": 1, "fusion_heads": 4, "head_dims": [20, 8, 6], "tasks": TASKS,
}
EPOCHS = 5
N_CLIPS = 200  # 140 train / 30 val / 30 test


def config_dict(output_dir: Path, data_root: Path, **train) -> dict:
    return {
        "name": "t", "seed": 0, "output_dir": str(output_dir),
        "model": {"overrides": MODEL},
        "data": {"root": str(data_root), "fine_grained_on_positives": True, "batch_size": 8},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "schedule": "plateau"},
        "train": {"epochs": EPOCHS, "log_every": 1, "progress_bar": False, **train},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def comparable(records: list[dict]) -> list[dict]:
    """metrics.jsonl without wall-clock throughput (the only field allowed to differ)."""
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        r.pop("clips_per_s", None)
        if isinstance(r.get("train"), dict):
            r["train"].pop("clips_per_s", None)
        out.append(r)
    return out


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_trees_equal(a, b, what: str) -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{jax.tree_util.keystr(path)}"
        # Bitwise: the same compiled step on the same inputs must give the same bits.
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(jax.device_get(tree))
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def abstract_of(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def restore_checkpoint(run_dir: Path, epoch: int, abstract):
    ck = RunCheckpointer(run_dir / "checkpoints", async_save=False)
    try:
        return ck.restore(epoch, abstract)
    finally:
        ck.close()


def checkpoint_epochs(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def one_line_error(err: str, prog: str = "mtjax.train") -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def no_plots(monkeypatch):
    # Plots are checked once on the shared run; matplotlib is slow on busy cores.
    import mtjax.plot

    monkeypatch.setattr(mtjax.plot, "plot_run", lambda run_dir: [])


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """Persistent compilation cache for this module only (restored afterwards)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory = tmp_path_factory.mktemp("jax_cache")
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()  # the cache is initialised once per process; re-read the settings
    yield directory
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from mtjax.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", N_CLIPS, seed=0,
                                  video_dim=20, audio_dim=12)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root, jax_cache):
    """One uninterrupted run of EPOCHS epochs: the reference most tests compare against."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    exp = ExperimentConfig.from_dict(config_dict(run_dir, data_root))
    t0 = time.perf_counter()
    trainer = train_mod.Trainer(exp)
    init_state = host(trainer.state)
    result = trainer.run()
    print(f"\nreference run: {time.perf_counter() - t0:.1f}s")
    return {"dir": run_dir, "exp": exp, "trainer": trainer, "result": result, "init_state": init_state}


def subprocess_env(jax_cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ----------------------------------------------------------------------------- learns + what a run writes


@pytest.mark.slow
def test_learns_clearly_above_majority_baseline(finished):
    trainer = finished["trainer"]
    train, test = trainer.datasets["train"], trainer.datasets["test"]
    base = majority_baseline(test.arrays["labels"], test.arrays["label_mask"],
                             fit_labels=train.arrays["labels"], fit_mask=train.arrays["label_mask"])
    got = finished["result"]["test"]
    print(f"test average F1 {got['average_f1']:.3f} vs majority baseline {base['average_f1']:.3f}")
    assert got["average_f1"] >= base["average_f1"] + 0.2
    # The comic-mischief task itself is learnt, not just averaged in.
    assert got["per_task"]["binary"]["f1"] >= base["per_task"]["binary"]["f1"] + 0.3
    # And the training loss went down.
    epochs = [r for r in read_jsonl(finished["dir"] / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[-1]["train"]["loss"] < 0.8 * epochs[0]["train"]["loss"]


@pytest.mark.slow
def test_run_writes_metrics_plots_and_test_metrics(finished):
    run_dir = finished["dir"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps_per_epoch = math.ceil(len(finished["trainer"].datasets["train"]) / 8)
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    # log_every=1: one step record per step, numbered 1..N without gaps.
    assert [r["step"] for r in steps] == list(range(1, EPOCHS * steps_per_epoch + 1))
    for r in steps:
        assert set(r["task_losses"]) == set(TASKS) == set(r["loss_weights"])
        assert r["finite"] == 1 and math.isfinite(r["loss"]) and r["lr"] > 0
        # unweighted: the loss is the plain sum of the task losses
        assert r["loss"] == pytest.approx(sum(r["task_losses"].values()), rel=1e-5)
    for r in epochs:
        assert r["step"] == (r["epoch"] + 1) * steps_per_epoch
        assert set(r["val"]["per_task"]) == set(TASKS) and 0 <= r["val"]["average_f1"] <= 1
    for name in ("loss.png", "val_metrics.png", "lr.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    result = json.loads((run_dir / "test_metrics.json").read_text())
    vals = [r["val"]["average_f1"] for r in epochs]
    assert result["best_epoch"] == int(np.argmax(vals))  # first epoch with the best val score
    assert Path(result["best_model"]) == run_dir / "checkpoints" / str(result["best_epoch"])
    assert set(result["test"]["per_task"]) == set(TASKS)
    assert result["test"]["per_task"]["binary"]["support"] == len(finished["trainer"].datasets["test"])
    # kept: the last 3 epochs and the best
    assert checkpoint_epochs(run_dir) == sorted({EPOCHS - 3, EPOCHS - 2, EPOCHS - 1, result["best_epoch"]})
    assert (run_dir / "experiment.json").is_file()


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_with_more_epochs_is_exact(finished, data_root, tmp_path, monkeypatch, capsys):
    no_plots(monkeypatch)
    run_dir = tmp_path / "resumed"
    cfg = write_yaml(tmp_path / "exp.yaml", config_dict(run_dir, data_root, epochs=1))
    assert train_mod.main(["--config", str(cfg)]) == 0
    assert checkpoint_epochs(run_dir) == [0]
    assert train_mod.main(["--resume", str(run_dir), f"train.epochs={EPOCHS}"]) == 0
    assert "resumed" in capsys.readouterr().out

    ref = finished["dir"]
    abstract = abstract_of(finished["trainer"].state)
    mine, run_mine = restore_checkpoint(run_dir, EPOCHS - 1, abstract)
    theirs, run_theirs = restore_checkpoint(ref, EPOCHS - 1, abstract)
    # params, batch stats, optimizer (incl. the plateau-set lr), rng, weighting: all of it
    assert_trees_equal(host(mine), host(theirs), "state")
    assert_trees_equal(host(mine), host(finished["trainer"].state), "state vs in-memory")
    assert run_mine["best"] == run_theirs["best"] and run_mine["step"] == run_theirs["step"]
    assert comparable(read_jsonl(run_dir / "metrics.jsonl")) == comparable(read_jsonl(ref / "metrics.jsonl"))
    a = json.loads((run_dir / "test_metrics.json").read_text())
    b = json.loads((ref / "test_metrics.json").read_text())
    assert (a["best_epoch"], a["test"]) == (b["best_epoch"], b["test"])


class Interrupt(RuntimeError):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_from_last_complete_epoch(finished, data_root, tmp_path, monkeypatch):
    no_plots(monkeypatch)
    run_dir = tmp_path / "interrupted"
    exp = ExperimentConfig.from_dict(config_dict(run_dir, data_root))
    trainer = train_mod.Trainer(exp)
    steps_per_epoch = sum(1 for _ in trainer.schedule.steps(0))
    real_step, calls = trainer.train_step, [0]

    def dies_in_epoch_1(state, batch, mask):
        calls[0] += 1
        if calls[0] > steps_per_epoch + 3:  # 3 steps into epoch 1
            raise Interrupt("simulated crash")
        return real_step(state, batch, mask)

    trainer.train_step = dies_in_epoch_1
    with pytest.raises(Interrupt):
        trainer.run()
    assert checkpoint_epochs(run_dir) == [0]
    partial = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in partial if r["epoch"] == 1] == [steps_per_epoch + i for i in (1, 2, 3)]

    resumed = train_mod.Trainer(exp, resume=True)
    assert resumed.epoch == 1
    resumed.run()
    assert_trees_equal(host(resumed.state), host(finished["trainer"].state), "state")
    # the partial epoch's step records were dropped on resume, then written again
    assert comparable(read_jsonl(run_dir / "metrics.jsonl")) == comparable(
        read_jsonl(finished["dir"] / "metrics.jsonl"))


# ----------------------------------------------------------------------------- checkpoint retention


def test_checkpointer_keeps_last_n_and_the_best(tmp_path):
    from mtjax.run_checkpoints import resolve_model_dir

    ck = RunCheckpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    variables = {"params": {"w": np.zeros((2,), np.float32)}}
    scores = [0.3, 0.9, 0.5, 0.9, 0.4, 0.2]  # best 0.9, first reached at epoch 1
    try:
        for epoch, score in enumerate(scores):
            ck.save(epoch, {"x": np.full((3,), epoch, np.float32)}, variables, ModelConfig(), {"epoch": epoch},
                    select_value=score)
        assert ck.best_epoch() == 1  # not the latest, and the earlier of two equal scores
        assert ck.manager.all_steps() == [1, 4, 5]
    finally:
        ck.close()
    assert resolve_model_dir(tmp_path) == tmp_path / "checkpoints" / "1"


# ----------------------------------------------------------------------------- crash during save

CRASH_DRIVER = r"""
import sys
import jax.numpy as jnp
from mtjax.config import ModelConfig
from mtjax.run_checkpoints import RunCheckpointer

directory, n = sys.argv[1], int(sys.argv[2])
ck = RunCheckpointer(directory, keep=2, async_save=True)
variables = {"params": {"w": jnp.zeros((2,), jnp.float32)}}
for epoch in range(10_000):
    # epoch e holds the value e + 1 everywhere, so a restore says which save it came from
    state = {"big": jnp.full((n,), epoch + 1, jnp.float32), "epoch": jnp.asarray(epoch, jnp.int32)}
    ck.save(epoch, state, variables, ModelConfig(), {"epoch": epoch}, select_value=float(epoch))
"""
BIG = 12_500_000  # float32: 50 MB per checkpoint, so each write takes a while


def _kill_during_save(ckpt_dir: Path, env: dict, driver: Path) -> str | None:
    """Starts the driver and SIGKILLs it while a save is in flight and at least one earlier
    checkpoint is complete. Returns the in-flight temporary directory's name, or None if the
    kill landed just after a save completed."""
    log = ckpt_dir.parent / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(driver), str(ckpt_dir), str(BIG)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"driver exited early ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint write observed within 180 s")
            names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
            if any(n.isdigit() for n in names) and any(".orbax-checkpoint-tmp" in n for n in names):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tmp = [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
    return tmp[0] if tmp else None


@pytest.mark.slow
def test_sigkill_while_saving_leaves_only_complete_checkpoints(tmp_path, jax_cache):
    driver = tmp_path / "driver.py"
    driver.write_text(CRASH_DRIVER)
    env = subprocess_env(jax_cache)
    for attempt in range(3):
        ckpt_dir = tmp_path / f"attempt{attempt}" / "checkpoints"
        in_flight = _kill_during_save(ckpt_dir, env, driver)
        if in_flight is not None:
            break
    else:
        pytest.fail("three kills in a row landed between saves; could not catch a save in flight")
    crashed_epoch = int(in_flight.split(".")[0])
    complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    assert crashed_epoch not in complete and complete and max(complete) == crashed_epoch - 1

    abstract = {"big": jax.ShapeDtypeStruct((BIG,), jnp.float32), "epoch": jax.ShapeDtypeStruct((), jnp.int32)}
    ck = RunCheckpointer(ckpt_dir, keep=2, async_save=False)
    try:
        # the half-written save is invisible; the last complete one is the latest
        assert ck.manager.all_steps() == complete
        assert ck.latest_epoch() == crashed_epoch - 1
        for epoch in complete:  # every visible checkpoint restores whole, with its own values
            state, run = ck.restore(epoch, abstract)
            big = np.asarray(state["big"])
            assert run["epoch"] == epoch and int(state["epoch"]) == epoch
            assert big.min() == big.max() == epoch + 1
        # and the run can carry on: the crashed epoch saves again over the debris
        ck.save(crashed_epoch, {"big": jnp.zeros((4,)), "epoch": jnp.asarray(crashed_epoch, jnp.int32)},
                {"params": {"w": jnp.zeros((2,))}}, ModelConfig(), {"epoch": crashed_epoch}, select_value=0.0)
        ck.wait()
        assert ck.latest_epoch() == crashed_epoch
        # (orbax removes the debris in the background on open; a save waits for that)
        assert not [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
        state, run = ck.restore(crashed_epoch, {"big": jax.ShapeDtypeStruct((4,), jnp.float32),
                                                "epoch": jax.ShapeDtypeStruct((), jnp.int32)})
        assert run["epoch"] == crashed_epoch and np.asarray(state["big"]).shape == (4,)
    finally:
        ck.close()


# ----------------------------------------------------------------------------- non-finite steps


@pytest.mark.slow
def test_nan_batch_changes_nothing_then_a_clean_step_trains(finished):
    trainer = finished["trainer"]
    step = trainer.train_step  # the run's own compiled step
    clips, batch, mask = next(iter(trainer.schedule.steps(0)))
    bad = {**batch, "video": batch["video"].copy()}
    bad["video"][0, 0, 0] = np.nan

    state = jax.tree_util.tree_map(jnp.copy, trainer.state["train"])  # the step donates its input
    before = host(state)
    state, metrics = step(state, bad, mask)
    after = host(state)
    assert int(metrics["finite"]) == 0
    # BatchNorm's batch statistics spread the NaN to every clip: every task loss is NaN
    # (not a clamped 100), so a report can name them.
    assert np.isnan(np.asarray(metrics["task_losses"])).all() and np.isnan(float(metrics["loss"]))
    for field in ("params", "batch_stats", "opt_state", "weight_params", "weighting_state"):
        assert_trees_equal(getattr(after, field), getattr(before, field), field)
    assert int(after.step) == int(before.step) + 1  # the step is counted (the host reports it)

    state, metrics = step(state, batch, mask)
    clean = host(state)
    assert int(metrics["finite"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert all_finite(clean.params) and all_finite(clean.opt_state)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(clean.params),
                                                       jax.tree_util.tree_leaves(before.params))]
    assert sum(moved) > 0.9 * len(moved)  # practically every parameter array was updated
    for task in TASKS:  # BatchNorm running statistics moved too
        assert not np.array_equal(clean.batch_stats[f"heads_{task}"]["bn0"]["mean"],
                                  before.batch_stats[f"heads_{task}"]["bn0"]["mean"])


@pytest.mark.parametrize("schedule, queued", [("all_at_once", 1), ("dynamic_difficulty_sampling", 0)])
def test_the_host_handles_a_step_while_the_next_one_is_queued(data_root, tmp_path, jax_cache, schedule, queued):
    """Step i's metrics are fetched (which waits for step i) only after step i+1 is
    dispatched, so the device never idles while the host logs; DDS, whose next batch
    depends on the last step's losses, handles each step before drawing the next batch.
    Either way every step is handled once, in order, with its own number."""
    exp = ExperimentConfig.from_dict({**config_dict(tmp_path / "run", data_root, epochs=1, max_steps_per_epoch=4),
                                      "strategy": {"schedule": schedule}})
    trainer = train_mod.Trainer(exp)
    dispatched, handled = [0], []
    step_fn, handle = trainer.train_step, trainer._handle_step

    def counting_step(*args):
        dispatched[0] += 1
        return step_fn(*args)

    def recording_handle(log, epoch, step, *rest):
        handled.append((step, dispatched[0]))
        return handle(log, epoch, step, *rest)

    trainer.train_step, trainer._handle_step = counting_step, recording_handle
    log = train_mod.MetricsLog(tmp_path / "metrics.jsonl")
    try:
        stats = trainer.train_epoch(0, log)
    finally:
        log.close()
    n = dispatched[0]
    assert n >= 3 and [s for s, _ in handled] == list(range(1, n + 1))
    assert [d for _, d in handled[:-1]] == [min(s + queued, n) for s, _ in handled[:-1]]
    assert int(trainer.state["train"].step) == n and math.isfinite(stats["loss"])
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"] == list(range(1, n + 1))


@pytest.mark.slow
def test_huge_learning_rate_stops_with_a_report_and_checkpoints_stay_finite(
        finished, data_root, tmp_path, monkeypatch, capsys):
    """lr=1e6: step 1 is finite but throws the weights far off; every later step is NaN.
    With 2 steps per epoch and max_consecutive_skips=2, epoch 0 ends (one skip), is
    validated and checkpointed, and epoch 1's first step is the second skip in a row:
    exit 3 with a report. The checkpoint written before the stop holds finite values only."""
    no_plots(monkeypatch)
    run_dir = tmp_path / "huge_lr"
    cfg = write_yaml(tmp_path / "exp.yaml", config_dict(run_dir, data_root, epochs=3, max_steps_per_epoch=2))
    code = train_mod.main(["--config", str(cfg), "optim.lr=1e6", "optim.schedule=constant",
                           "train.max_consecutive_skips=2"])
    err = capsys.readouterr().err
    assert code == 3, err
    report = json.loads((run_dir / "nonfinite_report.json").read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    skips = [r for r in records if r["kind"] == "skip"]
    assert [(r["step"], r["epoch"]) for r in skips] == [(2, 0), (3, 1)]
    assert (report["step"], report["epoch"], report["consecutive_skips"]) == (3, 1, 2)
    assert report["clips"] == skips[-1]["clips"] and len(report["clips"]) == 8
    assert set(report["clips"]) <= set(finished["trainer"].datasets["train"].clips)
    assert report["nonfinite_tasks"] == TASKS  # the NaN outputs reach every task's loss
    assert all(not math.isfinite(report["task_losses"][t]) for t in TASKS)
    assert "Traceback" not in err and f"at step {report['step']}" in err and "nonfinite_report.json" in err
    # Validation of the diverged weights: NaN outputs are scored as wrong, not a crash.
    assert "non-finite outputs on 30 of 30 clips" in err
    (epoch0,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch0["val"]["average_f1"] == 0.0

    assert checkpoint_epochs(run_dir) == [0]
    # optim.schedule=constant: no plateau state beside the train state
    abstract = {"train": abstract_of(finished["trainer"].state["train"]), "plateau": {}}
    state, run = restore_checkpoint(run_dir, 0, abstract)
    assert all_finite(state), "non-finite train state in the checkpoint"
    _, variables, _ = load_model(run_dir / "checkpoints" / "0")
    assert all_finite(variables), "non-finite model variables in the checkpoint"
    # the skipped step 2 changed nothing: the checkpoint holds the weights after step 1
    assert int(state["train"].step) == 2 and run["consecutive_skips"] == 1
    assert_trees_equal(host(variables["params"]), host(state["train"].params), "variables vs state")
    far = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(host(variables["params"])))
    assert far > 1e5  # really thrown off by step 1 (finite, but useless)


def test_nan_feature_file_is_rejected_at_load(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    split_json, i3d_dir, _ = split_paths(root, "train")
    imdb = next(iter(json.loads(split_json.read_text()).values()))["IMDBid"]
    bad = i3d_dir / f"{imdb}_flow.npy"
    arr = np.load(bad)
    arr[1, 2] = np.nan
    np.save(bad, arr)
    cfg = write_yaml(tmp_path / "exp.yaml", config_dict(tmp_path / "run", root))
    assert train_mod.main(["--config", str(cfg)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(bad) in line and "non-finite" in line


# ----------------------------------------------------------------------------- bad configs


def test_bad_configs_fail_in_one_line(data_root, tmp_path, capsys):
    good = config_dict(tmp_path / "run", data_root)
    cfg = write_yaml(tmp_path / "exp.yaml", good)

    def fails(argv, *needles):
        assert train_mod.main(argv) == 2
        line = one_line_error(capsys.readouterr().err)
        for n in needles:
            assert n in line, f"{n!r} not in {line!r}"

    unknown = {**good, "optim": {**good["optim"], "learning_rate": 1e-3}}
    fails(["--config", str(write_yaml(tmp_path / "unknown.yaml", unknown))], "optim.learning_rate")
    fails(["--config", str(cfg), "train.epoch=3"], "train.epoch")
    fails(["--config", str(cfg), "train.epochs=two"], "train.epochs", "int")
    fails(["--config", str(tmp_path / "missing.yaml")], str(tmp_path / "missing.yaml"), "not found")
    fails(["--config", str(cfg), f"data.root={tmp_path / 'nowhere'}"], "data.root", str(tmp_path / "nowhere"))
    fails(["--resume", str(tmp_path / "not_a_run")], "not_a_run")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_init_checkpoint_without_the_heads_fails_in_one_line(data_root, tmp_path, capsys):
    # A binary-only model directory (zeros of the right shapes: only its config is read).
    from mtjax.models.hiccap import init_variables

    config = ModelConfig.from_dict({**MODEL, "tasks": ["binary"]})
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0)))
    ckpt = save_model(tmp_path / "binary_model", jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                      config)
    exp = config_dict(tmp_path / "run", data_root)
    exp["model"] = {"init_checkpoint": str(ckpt), "overrides": {"tasks": TASKS}}
    assert train_mod.main(["--config", str(write_yaml(tmp_path / "exp.yaml", exp))]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "model.overrides.tasks" in line and str(ckpt) in line
    assert "mature, gory, slapstick, sarcasm" in line


@pytest.mark.slow
def test_bad_config_in_a_real_process(data_root, tmp_path):
    cfg = write_yaml(tmp_path / "exp.yaml", config_dict(tmp_path / "run", data_root))
    proc = subprocess.run([sys.executable, "-m", "mtjax.train", "--config", str(cfg), "optim.lr=fast"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "optim.lr" in line and "'fast'" in line


# ----------------------------------------------------------------------------- evaluate CLI


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_runs_test_metrics(finished, jax_cache):
    run_dir = finished["dir"]
    proc = subprocess.run([sys.executable, "-m", "mtjax.evaluate", "--checkpoint", str(run_dir),
                           "--split", "test"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=subprocess_env(jax_cache))
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((run_dir / "test_metrics.json").read_text())
    got = json.loads((run_dir / "eval_test.json").read_text())
    assert got["model_dir"] == expected["best_model"]  # the run's best epoch
    assert got["metrics"] == expected["test"]
    assert got["reader"]["fine_grained_on_positives"] is True  # taken from experiment.json
    assert "average F1" in proc.stdout


@pytest.mark.slow
def test_evaluate_cli_on_a_model_directory(finished, data_root, tmp_path, capsys):
    from mtjax import evaluate

    best = Path(json.loads((finished["dir"] / "test_metrics.json").read_text())["best_model"])
    config, variables, _ = load_model(best)
    model_dir = save_model(tmp_path / "converted", variables, config)  # like convert.weights output

    assert evaluate.main(["--checkpoint", str(model_dir), "--split", "test"]) == 2
    line = one_line_error(capsys.readouterr().err, "mtjax.evaluate")
    assert "--data-root" in line and str(model_dir) in line
    assert evaluate.main(["--checkpoint", str(model_dir), "--split", "nosuch", "--data-root", str(data_root)]) == 2
    assert "nosuch_features_lrec_camera.json" in one_line_error(capsys.readouterr().err, "mtjax.evaluate")
    assert evaluate.main(["--checkpoint", str(tmp_path / "absent"), "--split", "test"]) == 2
    assert "absent" in one_line_error(capsys.readouterr().err, "mtjax.evaluate")

    out = tmp_path / "m.json"
    assert evaluate.main(["--checkpoint", str(model_dir), "--split", "test", "--data-root", str(data_root),
                          "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    run_test = json.loads((finished["dir"] / "test_metrics.json").read_text())["test"]
    # Outside a run the reader defaults apply (fine-grained tasks on every clip), so only the
    # binary task, which counts every clip either way, must agree with the run's numbers.
    assert got["reader"]["fine_grained_on_positives"] is False
    assert got["metrics"]["per_task"]["binary"] == run_test["per_task"]["binary"]
    assert got["metrics"]["per_task"]["mature"]["support"] == got["clips"]

    # An epoch directory inside the run finds the run's data options through the run:
    # its validation numbers are the ones logged for that epoch.
    out = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(best), "--split", "val", "--out", str(out)]) == 0
    logged = [r for r in read_jsonl(finished["dir"] / "metrics.jsonl")
              if r["kind"] == "epoch" and r["epoch"] == int(best.name)]
    assert json.loads(out.read_text())["metrics"] == logged[0]["val"]


# ----------------------------------------------------------------------------- reported L2


@pytest.mark.slow
def test_reported_constant_l2_inflates_the_loss_but_not_the_gradients(finished, data_root, tmp_path,
                                                                     monkeypatch):
    no_plots(monkeypatch)
    run_dir = tmp_path / "l2"
    exp = ExperimentConfig.from_dict(config_dict(run_dir, data_root, epochs=1, max_steps_per_epoch=1)
                                     | {"loss": {"l2": "reported_constant"}})
    trainer = train_mod.Trainer(exp)
    init = host(trainer.state["train"])
    assert_trees_equal(init.params, finished["init_state"]["train"].params, "same seed, same init")
    clips, batch, mask = next(iter(trainer.schedule.steps(0)))

    # One step each from the same state on the same batch: with and without the constant.
    copy = lambda: jax.tree_util.tree_map(jnp.asarray, init)  # noqa: E731
    with_l2, m_l2 = trainer.train_step(copy(), batch, mask)
    plain, m_plain = finished["trainer"].train_step(copy(), batch, mask)
    expected_extra = 0.1 * float(l2_norm_sum(init.params))
    assert expected_extra > 1.0  # big enough that the check below means something
    np.testing.assert_array_equal(np.asarray(m_l2["task_losses"]), np.asarray(m_plain["task_losses"]))
    assert float(m_l2["loss"]) - float(m_plain["loss"]) == pytest.approx(expected_extra, rel=1e-5)
    assert_trees_equal(host(with_l2.params), host(plain.params), "params after one step")
    assert_trees_equal(host(with_l2.opt_state), host(plain.opt_state), "optimizer after one step")
    assert float(m_l2["grad_norm"]) == float(m_plain["grad_norm"])

    # The run reports it: the first step record's loss = Σ task losses + 0.1·Σ‖w‖ of the init.
    trainer.run()
    first = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step")
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(sum(first["task_losses"].values()) + expected_extra, rel=1e-5)
    ref_first = next(r for r in read_jsonl(finished["dir"] / "metrics.jsonl") if r["kind"] == "step")
    assert first["task_losses"] == ref_first["task_losses"] and first["grad_norm"] == ref_first["grad_norm"]

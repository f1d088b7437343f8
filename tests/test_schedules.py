"""Schedules (mtjax/schedules.py): unit tests on an in-memory ClipDataset, no training,
plus one short Trainer run per new schedule."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tests._support import TINY_EXPERIMENT

from mtjax.config import ConfigError, ModelConfig
from mtjax.data import ClipDataset, DataError
from mtjax.schedules import (SCHEDULES, Curriculum, DynamicDifficultySampling, DynamicStopAndGo,
                             OneAtATime, make_schedule, split_strategy_options, task_streams)
from tests._support import random_batch

TASKS = ("binary", "mature", "gory", "slapstick", "sarcasm")
CFG = ModelConfig(bert=dict(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=16),
                  text_len=10, video_len=3, audio_len=3, video_dim=4, audio_dim=3, lstm_hidden=4,
                  lstm_layers=1, fusion_heads=2, head_dims=(6, 4, 4), tasks=TASKS)


def make_dataset(n=37, seed=0, positive_rate=0.45, tasks=TASKS) -> ClipDataset:
    """Binary counted on every clip, fine-grained tasks only on binary positives (the original
    recipe), so the streams have different sizes."""
    arrays = random_batch(CFG.replace(tasks=tasks), n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    positive = rng.random(n) < positive_rate
    positive[:2] = True  # every fine-grained stream has at least 2 clips
    arrays["labels"]["binary"] = np.eye(2, dtype=np.float32)[positive.astype(int)]
    for t in tasks:
        if t != "binary":
            arrays["label_mask"][t] = positive.astype(np.float32)
    flags = np.zeros(n, bool)
    return ClipDataset(clips=[f"clip{i:03d}" for i in range(n)], imdb_ids=[f"tt{i}" for i in range(n)],
                       ids=np.arange(n), arrays=arrays, tasks=tuple(tasks), video_missing=flags,
                       audio_missing=flags.copy(), rgb_flow_mismatch=flags.copy(), empty_features=flags.copy())


def make(name, dataset=None, *, batch_size=8, seed=0, epochs=None, **options):
    dataset = make_dataset() if dataset is None else dataset
    return make_schedule(name, dataset, dataset.tasks, batch_size=batch_size, seed=seed, model_config=CFG,
                         epochs=epochs, **options)


def shapes(batch):
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out.update({f"{k}.{t}": (np.shape(x), np.asarray(x).dtype) for t, x in v.items()})
        else:
            out[k] = (np.shape(v), np.asarray(v).dtype)
    return out


def slice_clips(clips, batch, task_index, task):
    """Clip names of the rows counting for `task` (label_mask 1)."""
    m = batch["label_mask"][task]
    return [clips[r] for r in np.flatnonzero(m[:len(clips)] > 0)]


def test_registry_has_every_spec_schedule():
    assert set(SCHEDULES) == {"all_at_once", "round_robin", "one_at_a_time", "dynamic_difficulty_sampling",
                              "dsg", "curriculum"}
    from mtjax.experiment import SCHEDULES as CONFIG_NAMES

    assert set(CONFIG_NAMES) == set(SCHEDULES)


# ----------------------------------------------------------------------------- DDS

def test_dds_clip_counts_formula_and_bound():
    n = DynamicDifficultySampling.clip_counts(np.array([1.0, 0, 0, 0, 0]), 8)
    assert n.tolist() == [8, 2, 2, 2, 2]
    n = DynamicDifficultySampling.clip_counts(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625]), 16)
    assert n.tolist() == [8, 4, 2, 2, 2]
    # NaN / negative weights are dropped and the rest renormalised; all bad -> uniform.
    assert DynamicDifficultySampling.clip_counts(np.array([np.nan, 1.0, -1.0]), 8).tolist() == [2, 8, 2]
    assert DynamicDifficultySampling.clip_counts(np.array([np.nan, np.nan]), 8).tolist() == [4, 4]
    rng = np.random.default_rng(0)
    for _ in range(500):
        T, B = int(rng.integers(1, 7)), int(rng.integers(1, 40))
        w = rng.dirichlet(np.ones(T) * rng.uniform(0.05, 3))
        n = DynamicDifficultySampling.clip_counts(w, B)
        assert (n >= 2).all() and n.sum() <= B + 2 * T
        assert (n >= np.ceil(w * B - 1e-9)).all() or n.sum() == B + 2 * T


def test_dds_weight_formula_on_hand_made_losses():
    prev = np.full(2, 0.5)
    L = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])  # equal means
    assert np.allclose(DynamicDifficultySampling.difficulty_weights(L, prev), [0.5, 0.5])
    L = np.array([[1.0, 3.0], [1.0, 3.0]])
    assert np.allclose(DynamicDifficultySampling.difficulty_weights(L, prev), [0.25, 0.75])
    # = mean_k(L_t) / mean_k(sum_t L_t) in general
    L = np.random.default_rng(1).uniform(0.1, 2, size=(10, 5))
    expect = L.mean(0) / L.sum(1).mean()
    assert np.allclose(DynamicDifficultySampling.difficulty_weights(L, np.full(5, 0.2)), expect)


def test_dds_observe_updates_every_k_steps_and_reports_sample_weights():
    s = make("dynamic_difficulty_sampling", k=3)
    assert s.sample_weights() == pytest.approx({t: 0.2 for t in TASKS})
    losses = np.array([4.0, 1.0, 1.0, 1.0, 1.0])
    s.observe(np.ones(5), losses)
    s.observe(np.ones(5), losses)
    assert s.sample_weights()["binary"] == pytest.approx(0.2)  # not yet: k = 3
    s.observe(np.ones(5), losses)
    assert s.sample_weights()["binary"] == pytest.approx(0.5)
    assert sum(s.sample_weights().values()) == pytest.approx(1.0)


def _run_epoch(s, epoch, losses_fn=None):
    steps = []
    for clips, batch, mask in s.steps(epoch):
        steps.append((clips, batch, mask))
        if losses_fn is not None:
            s.observe(mask, losses_fn(len(steps)))
    return steps


@pytest.mark.parametrize("skew", ["uniform", "binary_hard", "one_task_only"])
def test_dds_fixed_shape_min_clips_and_every_stream_covered(skew):
    ds = make_dataset()
    s = make("dynamic_difficulty_sampling", ds, k=2)
    T = len(TASKS)
    streams = task_streams(ds, TASKS)
    assert len({len(v) for v in streams.values()}) > 1  # streams of different sizes
    losses = {"uniform": np.ones(T), "binary_hard": np.array([10.0, 1, 1, 1, 1]),
              "one_task_only": np.array([0.0, 0, 0, 5.0, 0])}[skew]
    reference = None
    for epoch in range(2):
        steps = _run_epoch(s, epoch, lambda i: losses)
        seen = {t: Counter() for t in TASKS}
        for clips, batch, mask in steps:
            sh = shapes(batch)
            reference = reference or sh
            assert sh == reference  # one shape for every step: no recompilation
            assert sh["text"][0] == (8 + 2 * T, CFG.text_len)
            assert mask.dtype == np.float32 and mask.tolist() == [1.0] * T
            owners = np.zeros(len(clips))
            for i, t in enumerate(TASKS):
                m = batch["label_mask"][t]
                assert m[len(clips):].sum() == 0 and batch["example_mask"][len(clips):].sum() == 0
                assert m.sum() >= 2  # n_t >= 2
                owners += m[:len(clips)]
                seen[t].update(slice_clips(clips, batch, i, t))
            assert (owners == 1).all()  # every real row belongs to exactly one task's slice
            assert batch["example_mask"][:len(clips)].all()
        for t in TASKS:
            stream = {ds.clips[i] for i in streams[t]}
            assert set(seen[t]) == stream, f"{skew}: epoch {epoch} task {t} missed clips"
        # It ends with the last stream: one step fewer would leave some stream unfinished.
        last_clips, last_batch, _ = steps[-1]
        before = {t: Counter() for t in TASKS}
        for clips, batch, _ in steps[:-1]:
            for i, t in enumerate(TASKS):
                before[t].update(slice_clips(clips, batch, i, t))
        assert any(set(before[t]) != {ds.clips[i] for i in streams[t]} for t in TASKS)


def test_dds_collapse_zero_and_nan_losses_do_not_crash():
    s = make("dynamic_difficulty_sampling", k=2)
    T = len(TASKS)
    zero = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
    for _ in range(2):
        s.observe(np.ones(T), zero)
    w = s.weights.copy()
    assert w[0] == 0 and np.isclose(w.sum(), 1)
    nan = np.array([np.nan, 1.0, np.inf, 2.0, 3.0])
    for _ in range(2):
        s.observe(np.ones(T), nan)
    assert np.isfinite(s.weights).all() and np.isclose(s.weights.sum(), 1)
    # Tasks with no finite loss keep their share; the others split the rest by their losses.
    assert s.weights[0] == 0 and s.weights[2] == pytest.approx(0.25)
    assert s.weights[[1, 3, 4]] == pytest.approx(0.75 * np.array([1, 2, 3]) / 6)
    for _ in range(2):
        s.observe(np.ones(T), np.full(T, np.nan))  # nothing usable at all: unchanged
    assert np.isfinite(s.weights).all()
    steps = _run_epoch(s, 0, lambda i: np.full(T, np.nan) if i % 3 else np.zeros(T))
    assert steps and all(b["label_mask"][t].sum() >= 2 for _, b, _ in steps for t in TASKS)


def test_dds_order_is_a_function_of_seed_and_epoch():
    a = [c for c, _, _ in make("dynamic_difficulty_sampling").steps(0)]
    b = [c for c, _, _ in make("dynamic_difficulty_sampling").steps(0)]
    c = [c for c, _, _ in make("dynamic_difficulty_sampling").steps(1)]
    assert a == b and a != c


def test_dds_empty_stream_is_a_clear_error():
    ds = make_dataset()
    ds.arrays["label_mask"]["gory"][:] = 0
    with pytest.raises(DataError, match="gory"):
        make("dynamic_difficulty_sampling", ds)


# ----------------------------------------------------------------------------- DSG

def _val(values):
    return {"average_f1": 0.0, "per_task": {t: {"f1": v} for t, v in values.items()}}


def test_dsg_stop_after_small_improvement_over_two_evaluations_then_go_on_drop():
    ds = make_dataset(tasks=("binary", "mature"))
    s = make("dsg", ds, batch_size=4)
    seq_b = [0.5, 0.5004, 0.5003]  # +0.08 % over the last 2 evaluations -> stop
    seq_m = [0.5, 0.6, 0.7]
    for e, (b, m) in enumerate(zip(seq_b, seq_m)):
        assert s.status() == {"binary": "go", "mature": "go"}, e  # never before window + 1 evals
        s.end_epoch(e, _val({"binary": b, "mature": m}))
    assert s.status() == {"binary": "stop", "mature": "go"}
    # Stopped: updated only on steps where counter % iter_gap == 0.
    masks = [mask for _, _, mask in s.steps(3)]
    assert len(masks) >= 8
    assert [m[0] for m in masks[:8]] == [1, 0, 0, 0, 1, 0, 0, 0]
    assert all(m[1] == 1 for m in masks)
    # A 0.28 % drop below the best keeps it stopped; > 0.5 % below the best: go again.
    s.end_epoch(3, _val({"binary": 0.499, "mature": 0.71}))
    assert s.status()["binary"] == "stop"
    s.end_epoch(4, _val({"binary": 0.4975, "mature": 0.72}))
    assert s.status()["binary"] == "go"
    # Flat but still > 0.5 % below its best: diverged, not converged -> keeps going.
    for e in (5, 6):
        s.end_epoch(e, _val({"binary": 0.4975, "mature": 0.7 + 0.01 * e}))
        assert s.status()["binary"] == "go", e
    # Back near its best, the stop test counts from the evaluation at which it went again:
    # the recovery itself is an improvement, then 2 flat evaluations -> stop.
    for e in (7, 8):
        s.end_epoch(e, _val({"binary": 0.5003, "mature": 0.7 + 0.01 * e}))
        assert s.status()["binary"] == "go", e
    s.end_epoch(9, _val({"binary": 0.5003, "mature": 0.8}))
    assert s.status()["binary"] == "stop"
    assert [(x["task"], x["to"], x["epoch"]) for x in s.transitions] == [
        ("binary", "stop", 2), ("binary", "go", 4), ("binary", "stop", 9)]


def test_dsg_improvement_just_above_threshold_keeps_going_and_abs_mode():
    ds = make_dataset(tasks=("binary", "mature"))
    s = make("dsg", ds)
    for e, v in enumerate([0.5, 0.5, 0.5006]):  # +0.12 % relative
        s.end_epoch(e, _val({"binary": v, "mature": v}))
    assert s.status()["binary"] == "go"
    s = make("dsg", ds, threshold_mode="abs")  # 0.1 % = 0.001 in F1 units
    for e, v in enumerate([0.5, 0.5, 0.5006]):
        s.end_epoch(e, _val({"binary": v, "mature": v + 0.01 * e}))
    assert s.status() == {"binary": "stop", "mature": "go"}


def test_dsg_a_falling_task_is_diverging_not_converged():
    ds = make_dataset(tasks=("binary", "mature"))
    s = make("dsg", ds)
    for e, (b, m) in enumerate([(0.6, 0.6), (0.5, 0.598), (0.5, 0.5975)]):
        s.end_epoch(e, _val({"binary": b, "mature": m}))
    # binary: no improvement, but 17 % below its best -> stays go; mature: -0.4 %, within the
    # 0.5 % band of its best -> a plateau -> stop.
    assert s.status() == {"binary": "go", "mature": "stop"}


def test_dsg_all_stopped_steps_only_every_iter_gap():
    ds = make_dataset(tasks=("binary", "mature"))
    s = make("dsg", ds, iter_gap=3)
    n_batches = sum(1 for _ in make("all_at_once", ds).steps(0))
    for e in range(3):
        s.end_epoch(e, _val({"binary": 0.4, "mature": 0.3}))
    assert s.status() == {"binary": "stop", "mature": "stop"}
    masks = [m for _, _, m in s.steps(0)]
    assert len(masks) == len(range(0, n_batches, 3)) and all(m.tolist() == [1, 1] for m in masks)


def test_dsg_options_are_validated():
    with pytest.raises(ConfigError, match="iter_gap"):
        make("dsg", iter_gap=0)
    with pytest.raises(ConfigError, match="threshold_mode"):
        make("dsg", threshold_mode="percent")
    with pytest.raises(ConfigError, match="takes"):
        make("dsg", k=3)


# ----------------------------------------------------------------------------- one at a time

def test_one_at_a_time_masks_streams_and_epochs_per_task():
    ds = make_dataset()
    s = make("one_at_a_time", ds, epochs=7, order=["mature", "binary", "gory", "slapstick", "sarcasm"],
             epochs_per_task={"mature": 1, "binary": 2, "gory": 1, "slapstick": 1, "sarcasm": 2})
    assert s.plan == [("mature", 1), ("binary", 2), ("gory", 1), ("slapstick", 1), ("sarcasm", 2)]
    streams = task_streams(ds, TASKS)
    expected = ["mature", "binary", "binary", "gory", "slapstick", "sarcasm", "sarcasm"]
    for epoch, task in enumerate(expected):
        seen = set()
        ti = TASKS.index(task)
        for clips, batch, mask in s.steps(epoch):
            assert mask.tolist() == [1.0 if i == ti else 0.0 for i in range(len(TASKS))]
            assert batch["text"].shape[0] == 8
            assert batch["label_mask"][task][:len(clips)].all()  # only the task's own clips
            seen.update(clips)
        assert seen == {ds.clips[i] for i in streams[task]}, epoch


def test_one_at_a_time_default_split_and_validation():
    s = make("one_at_a_time", epochs=7)  # 7 epochs over 5 tasks: the last (hardest) get the extra
    assert [n for _, n in s.plan] == [1, 1, 1, 2, 2] and [t for t, _ in s.plan] == list(TASKS)
    assert [n for _, n in make("one_at_a_time", epochs=10, epochs_per_task=2).plan] == [2] * 5
    with pytest.raises(ConfigError, match="train.epochs=10"):
        make("one_at_a_time", epochs=5, epochs_per_task=2)
    with pytest.raises(ConfigError, match="fewer than the 5 tasks"):
        make("one_at_a_time", epochs=3)
    with pytest.raises(ConfigError, match="order"):
        make("one_at_a_time", epochs=5, order=["binary", "mature"])
    with pytest.raises(ConfigError, match="epochs_per_task"):
        make("one_at_a_time", epochs=5, epochs_per_task={"binary": 5})


# ----------------------------------------------------------------------------- curriculum

def test_curriculum_convergence_rates_and_ranking_on_hand_made_history():
    S = 10
    steps = np.arange(S, dtype=float)
    hist = np.stack([
        1.0 - 0.09 * steps,   # binary: 1.0 -> 0.19 (fast)
        1.0 - 0.01 * steps,   # mature: barely moves (hardest)
        1.0 - 0.05 * steps,   # gory
        2.0 - 0.04 * steps,   # slapstick: larger loss but slower *relative* decrease than gory
        np.full(S, np.nan),   # sarcasm: never finite -> treated as hardest of all
    ], axis=1)
    rates = Curriculum.convergence_rates(hist, 0.2)
    assert rates[0] == pytest.approx(1 - np.mean([0.19, 0.28]) / np.mean([1.0, 0.91]))
    assert rates[4] == -np.inf
    s = make("curriculum", epochs=3)
    assert s.rank(hist) == ["sarcasm", "mature", "slapstick", "gory", "binary"]
    # A task whose loss is already 0 counts as converged (easiest), not as a division by zero.
    assert Curriculum.convergence_rates(np.zeros((4, 1)))[0] == 1.0


def test_curriculum_phases_warmup_hard_then_dsg():
    ds = make_dataset()
    s = make("curriculum", ds, epochs=5, warmup_epochs=1, hard_epochs=1, iter_gap=2)
    assert s.num_hard == 2
    decrease = np.array([0.5, 0.01, 0.3, 0.02, 0.4])  # mature, then slapstick converge slowest
    n = 0
    for _, _, mask in s.steps(0):
        assert mask.tolist() == [1.0] * 5
        n += 1
        s.observe(mask, 1.0 - decrease * n / 10)
    s.end_epoch(0, _val({t: 0.5 for t in TASKS}))
    assert s.ranking[:2] == ["mature", "slapstick"] and s.hard_tasks == ["mature", "slapstick"]
    for _, _, mask in s.steps(1):
        assert mask.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    s.end_epoch(1, _val({t: 0.5 for t in TASKS}))  # the DSG phase's starting point
    assert s.dsg.history == [[0.5]] * 5
    masks = [m for _, _, m in s.steps(2)]
    assert all(m.tolist() == [1.0] * 5 for m in masks)  # DSG: everyone goes at first
    s.end_epoch(2, _val({t: 0.5 for t in TASKS}))
    s.end_epoch(3, _val({**{t: 0.5 for t in TASKS}, "gory": 0.9}))
    assert s.dsg.status() == {"binary": "stop", "mature": "stop", "gory": "go", "slapstick": "stop",
                              "sarcasm": "stop"}
    counter = s.dsg.counter
    masks = [m for _, _, m in s.steps(4)]
    assert [m.tolist() for m in masks] == [[1.0] * 5 if (counter + i) % 2 == 0 else [0.0, 0.0, 1.0, 0.0, 0.0]
                                           for i in range(len(masks))]


def test_curriculum_needs_an_epoch_for_dsg():
    with pytest.raises(ConfigError, match="train.epochs > warmup_epochs"):
        make("curriculum", epochs=2)
    with pytest.raises(ConfigError, match="num_hard"):
        make("curriculum", epochs=4, num_hard=9)


# ----------------------------------------------------------------------------- state

def _json(state):
    return json.loads(json.dumps(state, allow_nan=False))  # what the run checkpoint stores


def test_state_dict_round_trips_through_json():
    T = len(TASKS)
    dds = make("dynamic_difficulty_sampling", k=4)
    for i in range(6):
        dds.observe(np.ones(T), np.array([1.0 + i, np.nan, 0.5, 0.5, 0.5]))
    dds2 = make("dynamic_difficulty_sampling", k=4)
    dds2.load_state_dict(_json(dds.state_dict()))
    assert np.allclose(dds2.weights, dds.weights) and len(dds2._window) == 2
    for s in (dds, dds2):  # the pending window completes identically
        for _ in range(2):
            s.observe(np.ones(T), np.array([3.0, 1.0, 1.0, 1.0, 1.0]))
    assert np.allclose(dds2.weights, dds.weights) and not np.allclose(dds.weights, 0.2)
    assert [c for c, _, _ in dds.steps(1)] == [c for c, _, _ in dds2.steps(1)]

    dsg = make("dsg")
    for e, v in enumerate([0.5, 0.5, 0.5]):
        dsg.end_epoch(e, _val({t: v + (0.1 * e if t == "gory" else 0) for t in TASKS}))
    list(dsg.steps(3))
    dsg2 = make("dsg")
    dsg2.load_state_dict(_json(dsg.state_dict()))
    assert dsg2.status() == dsg.status() and dsg2.counter == dsg.counter and dsg2.best == dsg.best
    assert [m.tolist() for _, _, m in dsg.steps(4)] == [m.tolist() for _, _, m in dsg2.steps(4)]

    cur = make("curriculum", epochs=4)
    for i, (_, _, mask) in enumerate(cur.steps(0)):
        cur.observe(mask, np.array([1.0, 1.0 - 0.1 * i, 1.0, 1.0, 1.0]))
    cur.end_epoch(0, _val({t: 0.5 for t in TASKS}))
    cur2 = make("curriculum", epochs=4)
    cur2.load_state_dict(_json(cur.state_dict()))
    assert cur2.ranking == cur.ranking and cur2.hard_tasks == cur.hard_tasks
    assert [m.tolist() for _, _, m in cur2.steps(1)] == [m.tolist() for _, _, m in cur.steps(1)]

    one = make("one_at_a_time", epochs=5)
    one2 = make("one_at_a_time", epochs=5)
    one2.load_state_dict(_json(one.state_dict()))
    with pytest.raises(ConfigError, match="resume"):
        make("one_at_a_time", epochs=10).load_state_dict(_json(one.state_dict()))


def test_strategy_options_are_split_between_schedule_and_aggregator():
    assert split_strategy_options("dsg", {"iter_gap": 2, "c": 0.4}, has_aggregator=True) == (
        {"iter_gap": 2}, {"c": 0.4})
    assert split_strategy_options("all_at_once", {"c": 0.4}, has_aggregator=True) == ({}, {"c": 0.4})
    with pytest.raises(ConfigError, match="iter_gap"):
        split_strategy_options("dynamic_difficulty_sampling", {"iter_gap": 2}, has_aggregator=False)


# ----------------------------------------------------------------------------- short training runs

TINY = TINY_EXPERIMENT + "strategy: {{schedule: {schedule}, options: {options}}}\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mtjax.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("sched_data")
    make_synthetic_dataset(root, 60, seed=0, video_dim=8, audio_dim=6, video_frames_max=6, audio_frames_max=6,
                           max_sentences=2)
    return root


def _train(tmp_path, data, schedule, epochs, options="{}", overrides=()):
    from mtjax.experiment import load_experiment
    from mtjax.train import Trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "run", data=data, epochs=epochs, schedule=schedule,
                               options=options))
    trainer = Trainer(load_experiment(cfg, list(overrides)))
    result = trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return trainer, result, [r for r in lines if r["kind"] == "step"], [r for r in lines if r["kind"] == "epoch"]


@pytest.mark.slow
def test_train_dds_one_epoch_logs_sample_weights_and_compiles_once(tmp_path, tiny_data):
    trainer, result, steps, epochs = _train(tmp_path, tiny_data, "dynamic_difficulty_sampling", 1, "{k: 2}")
    assert trainer.train_step._cache_size() == 1  # one batch shape over the whole epoch
    assert len(epochs) == 1 and "average_f1" in result["test"]
    assert all(set(r["sample_weights"]) == {"binary", "mature", "gory"} for r in steps)
    assert all(sum(r["sample_weights"].values()) == pytest.approx(1.0) for r in steps)
    # Updated every k = 2 steps from the observed losses: not uniform any more.
    assert len({tuple(r["sample_weights"].values()) for r in steps}) > 1
    # The epoch read the whole binary stream (every train clip), at most B = 6 of it per step,
    # so it cannot have stopped with the (shorter) fine-grained streams.
    n_train = len(trainer.train_set)
    assert epochs[0]["step"] >= n_train / 6


@pytest.mark.slow
def test_train_dsg_curriculum_and_one_at_a_time_complete(tmp_path, tiny_data):
    from mtjax.sweep import compile_cache

    with compile_cache(tmp_path / "jax_cache"):  # the three runs compile the same step program
        _train_three(tmp_path, tiny_data)


def _train_three(tmp_path, tiny_data):
    trainer, result, steps, epochs = _train(tmp_path / "dsg", tiny_data, "dsg", 2, "{iter_gap: 2}")
    assert len(epochs) == 2 and "average_f1" in result["test"] and "sample_weights" not in steps[0]
    trainer, result, steps, epochs = _train(tmp_path / "cur", tiny_data, "curriculum", 3)
    assert len(epochs) == 3 and trainer.schedule.ranking is not None
    assert sorted(trainer.schedule.ranking) == ["binary", "gory", "mature"]
    trainer, result, steps, epochs = _train(tmp_path / "one", tiny_data, "one_at_a_time", 3,
                                            "{order: [gory, binary, mature]}")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    # one-hot steps: the loss weights of masked tasks are still logged, the loss is one task's
    assert trainer.schedule.epoch_tasks == ["gory", "binary", "mature"]


def test_train_rejects_a_plan_that_disagrees_with_train_epochs(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="train.epochs=6"):
        _train(tmp_path, tiny_data, "one_at_a_time", 2, "{epochs_per_task: 2}")

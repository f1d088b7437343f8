"""`optim.pack_small_arrays`: the optimizer over packed small arrays gives the per-array
step's parameters, skips a non-finite step the same way, and its state round-trips through
a run checkpoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import packed_params
from mtjax.config import tiny_model_config
from mtjax.models.hiccap import init_variables
from mtjax.mtl.registry import make_weighting
from mtjax.run_checkpoints import RunCheckpointer
from mtjax.train_step import init_train_state, make_optimizer, make_train_step
from tests._support import random_batch

CONFIG = tiny_model_config()
T = len(CONFIG.tasks)
MASK = np.ones(T, np.float32)
# Adam's eps, raised from 1e-8: the biases ahead of the heads' train-mode BatchNorm have
# gradients of pure rounding noise (~1e-9), which Adam with eps 1e-8 scales up to steps of
# the learning rate, so a one-ulp difference in the first step would become lr-sized
# differences in the next. With eps 1e-3 those noise steps stay small.
EPS = 1e-3


def test_pack_and_unpack_round_trip():
    big = packed_params.SMALL_ARRAY_MAX + 1
    tree = {"a": jnp.arange(3.0), "b": {"big": jnp.ones(big), "w": jnp.arange(8.0).reshape(2, 4) + 10},
            "half": jnp.ones(4, jnp.bfloat16), "count": jnp.arange(2)}
    packed = packed_params.pack(tree)
    # Tree order (a, b.big, b.w, count, half); the float32 small leaves only, flattened.
    np.testing.assert_array_equal(packed.small, np.concatenate([np.arange(3.0), np.arange(8.0) + 10]))
    assert [x.shape for x in packed.large] == [(big,), (2,), (4,)]
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    for template in (tree, like):
        back = packed_params.unpack(packed, template)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert packed_params.pack({"big": jnp.ones(big)}).small.shape == (0,)


@functools.lru_cache(maxsize=1)
def _initial_variables():
    return init_variables(CONFIG, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _parts(pack: bool, weighting_name: str, optimizer: tuple):
    """(weighting, optimizer, jitted step): one compile per setting for the whole module."""
    opts = {"weights": (0.1, 0.4, 0.2, 0.2)} if weighting_name == "predefined" else {}
    weighting = make_weighting(weighting_name, **opts)
    tx = make_optimizer(**{"name": "adam", "lr": 1e-3, "eps": EPS, **dict(optimizer)})
    step = jax.jit(make_train_step(CONFIG, tx, weighting, pack_small_arrays=pack), donate_argnums=0)
    return weighting, tx, step


def _state_and_step(pack: bool, weighting_name: str, **optimizer):
    weighting, tx, step = _parts(pack, weighting_name, tuple(sorted(optimizer.items())))
    variables = jax.tree_util.tree_map(jnp.copy, _initial_variables())
    state = init_train_state(variables, tx, weighting, None, num_tasks=T, rng=jax.random.PRNGKey(1),
                             pack_small_arrays=pack)
    return state, step


def _moments(state, pack: bool):
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["model"]
    return packed_params.unpack(mu, state.params) if pack else mu


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# famo recomputes the losses at the new parameters (the unpacked update).
@pytest.mark.parametrize("weighting, optimizer", [
    ("predefined", {}),
    ("famo", {"name": "adamw", "weight_decay": 0.01, "clip_norm": 0.5}),
])
def test_packed_step_gives_the_per_array_steps_parameters(weighting, optimizer):
    runs = {}
    for pack in (False, True):
        state, step = _state_and_step(pack, weighting, **optimizer)
        if pack:
            mu = optax.tree_utils.tree_get(state.opt_state, "mu")["model"]
            assert isinstance(mu, packed_params.Packed) and mu.small.size > 0
        runs[pack] = []
        for i in range(3):
            state, metrics = step(state, random_batch(CONFIG, 4, seed=i), MASK)
            assert int(metrics["finite"]) == 1
            runs[pack].append((_host(state.params), _host(_moments(state, pack)), _host(state.weight_params),
                               float(metrics["grad_norm"])))
    # Adam is elementwise, so packing changes no value in exact arithmetic. Not bit for bit:
    # XLA compiles the packed update in another fusion (x/√v may become x·rsqrt(v)) and the
    # gradient norm sums its squares in another order: one ulp (~1e-8 on parameters of ~0.1
    # after the first step, measured). Those ulps then pass through the next forward, which
    # the tiny model's BatchNorm over 4 clips amplifies (6e-5 relative in the moments after
    # three steps, measured), so steps 2 and 3 are held to 1e-3. A packing error (a slice
    # out of place, a state not carried) differs at O(1).
    for i, (per_array, packed) in enumerate(zip(runs[False], runs[True])):
        rtol, atol = (1e-6, 1e-9) if i == 0 else (1e-3, 1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(per_array), jax.tree_util.tree_leaves(packed)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"after step {i + 1}")
    params = runs[True][-1][0]
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), params,
                                   _host(_initial_variables()["params"]))
    assert min(jax.tree_util.tree_leaves(moved["att1"])) > 0  # the packed small arrays moved too


def test_packed_step_skips_a_non_finite_step():
    state, step = _state_and_step(True, "predefined")
    state, _ = step(state, random_batch(CONFIG, 4, seed=0), MASK)
    before = _host(state)
    bad = random_batch(CONFIG, 4, seed=1)
    bad["video"] = np.full_like(bad["video"], np.nan)
    state, metrics = step(state, bad, MASK)
    assert int(metrics["finite"]) == 0
    # Nothing moves, the skip counters included: the step keeps its whole old state.
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                    jax.tree_util.tree_leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_packed_state_round_trips_through_a_run_checkpoint(tmp_path):
    state, step = _state_and_step(True, "predefined")
    state, _ = step(state, random_batch(CONFIG, 4, seed=0), MASK)
    ck = RunCheckpointer(tmp_path / "checkpoints", async_save=False)
    try:
        ck.save(0, {"train": state}, _initial_variables(), CONFIG, {"epoch": 0}, 0.5)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"train": state})
        restored, _ = ck.restore(0, abstract)
    finally:
        ck.close()
    mu = optax.tree_utils.tree_get(restored["train"].opt_state, "mu")["model"]
    assert isinstance(mu, packed_params.Packed)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves({"train": state})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the restored state steps on
    state, metrics = step(restored["train"], random_batch(CONFIG, 4, seed=1), MASK)
    assert int(metrics["finite"]) == 1


def _run_dir(tmp_path, **optim):
    from mtjax.experiment import ExperimentConfig

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    exp = ExperimentConfig.from_dict({"name": "t", "output_dir": str(tmp_path), "data": {"root": str(tmp_path)},
                                      "optim": optim})
    (run_dir / "experiment.json").write_text(exp.to_json())
    return run_dir


def test_new_runs_pack_and_resume_refuses_to_change_it(tmp_path, capsys):
    from mtjax import train as train_mod
    from mtjax.experiment import ExperimentConfig, load_run_experiment

    assert ExperimentConfig.from_dict({"name": "t", "data": {"root": "d"}}).optim.pack_small_arrays
    run_dir = _run_dir(tmp_path)
    assert load_run_experiment(run_dir, ["train.epochs=9"]).optim.pack_small_arrays
    assert train_mod.main(["--resume", str(run_dir), "optim.pack_small_arrays=false"]) == 2
    err = capsys.readouterr().err
    assert "optim.pack_small_arrays cannot change on resume" in err and "saved packed" in err


def test_runs_from_before_the_setting_resume_per_array(tmp_path):
    import json

    from mtjax.experiment import ConfigError, load_run_experiment

    run_dir = _run_dir(tmp_path)
    data = json.loads((run_dir / "experiment.json").read_text())
    del data["optim"]["pack_small_arrays"]  # experiment.json as earlier versions wrote it
    (run_dir / "experiment.json").write_text(json.dumps(data))
    assert not load_run_experiment(run_dir).optim.pack_small_arrays
    with pytest.raises(ConfigError, match="cannot change on resume .*saved per array"):
        load_run_experiment(run_dir, ["optim.pack_small_arrays=true"])
    (run_dir / "experiment.json").write_text("{not json")
    with pytest.raises(ConfigError, match="experiment.json: not readable as JSON"):
        load_run_experiment(run_dir)

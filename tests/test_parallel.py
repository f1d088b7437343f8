"""Data parallel (mtjax/parallel.py): the sharded train step equals the single-device step.

Runs in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (4 CPU
devices), so the flag never leaks into the other tests' JAX. Two steps with dropout ON and
BatchNorm in batch-statistics mode: equal losses and parameters (≤ 1e-5) show that the
gradients are all-reduced, that BatchNorm sees the GLOBAL batch (a per-shard mean over 2
clips would differ at once) and that dropout draws the same bits under sharding: threefry's
masks, and the hash masks (`bert.hidden_dropout_impl`, `model.dropout_impl`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_parity import _gradient_is_analytically_zero

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from mtjax.config import ModelConfig
    from mtjax.models.hiccap import init_variables
    from mtjax.mtl.weightings import predefined
    from mtjax.parallel import (ParallelConfig, make_mesh, parallel_train_step, shard_batch,
                                state_shardings)
    from mtjax.train_step import init_train_state, make_optimizer, make_train_step
    from tests._support import random_batch

    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig(bert=dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16),
                      text_len=12, video_len=4, audio_len=5, video_dim=8, audio_dim=6, lstm_hidden=8,
                      lstm_layers=1, fusion_heads=2, head_dims=(12, 8, 4))
    # The hash masks (BERT's hidden states, HICCAP's own dropouts) too: drawn from iotas that
    # XLA partitions, so a shard draws its examples' global bits.
    hashed = cfg.replace(bert=dataclasses.replace(cfg.bert, hidden_dropout_impl="hash"), dropout_impl="hash")
    opt = make_optimizer("adam", lr=1e-4)  # LR below
    weighting = predefined((0.1, 0.4, 0.2, 0.2))
    mask = jnp.ones(4, jnp.float32)
    batches = [random_batch(cfg, 8, seed=s) for s in (1, 2)]
    for b in batches:
        b["example_mask"] = np.ones(8, np.float32)

    def fresh_state():
        variables = init_variables(cfg, jax.random.PRNGKey(0))  # same parameters for `hashed`
        return init_train_state(variables, opt, weighting, None, num_tasks=4, rng=jax.random.PRNGKey(3))

    def run(step, state, place):
        losses, norms = [], []
        for b in batches:
            state, m = step(state, place(b), mask)
            assert int(m["finite"]) == 1
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        return state, losses, norms

    def leaves(state):
        flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x, np.float64) for path, x in flat}

    def compare(model, modes):
        # The single-device run of `model`, then each parallel mode's against it.
        step_fn = make_train_step(model, opt, weighting)          # dropout ON (deterministic=False)
        single_state, single_losses, single_norms = run(jax.jit(step_fn), fresh_state(), lambda b: b)
        ref = leaves(single_state)
        result = {"single_losses": single_losses, "single_norms": single_norms}
        for name, pcfg in modes:
            mesh = make_mesh(pcfg)
            state = fresh_state()
            shardings = state_shardings(state, mesh, pcfg)
            state = jax.device_put(state, shardings)
            step = parallel_train_step(step_fn, mesh, shardings, pcfg)
            first = shard_batch(batches[0], mesh, pcfg)
            state, losses, norms = run(step, state, lambda b: shard_batch(b, mesh, pcfg))
            got = leaves(state)
            params = jax.tree_util.tree_leaves(state.params)
            result[name] = {
                "losses": losses, "norms": norms,
                "diffs": {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref},
                "batch_devices": len(first["video"].sharding.device_set),
                "batch_shard_rows": sorted({s.data.shape[0] for s in first["video"].addressable_shards}),
                "param_devices": min(len(p.sharding.device_set) for p in params),
                "split_params": sum(not p.sharding.is_fully_replicated for p in params),
                "n_params": len(params),
            }
        return result

    dp = ("dp", ParallelConfig(enabled=True))
    fsdp = ("fsdp", ParallelConfig(enabled=True, fsdp=True, fsdp_min_size=256))
    out = {"threefry": compare(cfg, (dp, fsdp)), "hash": compare(hashed, (dp,))}
    print("RESULT " + json.dumps(out))
""")


LR, STEPS = 1e-4, 2


def _noise_driven(name: str) -> bool:
    """Leaves whose exact gradient is 0 (tests/test_parity.py lists why); Adam turns the
    rounding noise there (~1e-10, different for a different reduction order) into steps of
    up to lr, so they are held to that bound instead. Running means follow such biases."""
    parts = name.split("/")
    return _gradient_is_analytically_zero(tuple(parts[1:])) or (parts[0] == "batch_stats" and parts[-1] == "mean")


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ)
    # Cheaper CPU compiles (both sides get the same flags, so the comparison is unaffected).
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("masks, mode", [("threefry", "dp"), ("threefry", "fsdp"), ("hash", "dp")])
def test_sharded_step_equals_single_device_step(result, masks, mode):
    result = result[masks]
    r = result[mode]
    # The batch really is split 4 ways (2 of the 8 clips per device) ...
    assert r["batch_devices"] == 4 and r["batch_shard_rows"] == [2]
    # ... and the state lives on all 4 devices (replicated, or split under FSDP).
    assert r["param_devices"] == 4
    if mode == "dp":
        assert r["split_params"] == 0
    else:
        assert 0 < r["split_params"] < r["n_params"]
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(r["losses"], result["single_losses"]))
    # The all-reduced gradient has the single-device norm.
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(r["norms"], result["single_norms"]))
    # Parameters and BatchNorm running statistics after 2 steps.
    exact = {k: d for k, d in r["diffs"].items() if not _noise_driven(k)}
    noisy = {k: d for k, d in r["diffs"].items() if _noise_driven(k)}
    assert len(exact) > 30 and noisy
    worst = max(exact, key=exact.get)
    assert exact[worst] <= 1e-5, (worst, exact[worst])
    assert max(noisy.values()) <= 2 * STEPS * LR
    # Two different batches gave two different losses: the comparison is not vacuous.
    assert result["single_losses"][0] != result["single_losses"][1]

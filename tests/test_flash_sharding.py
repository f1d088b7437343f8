"""The flash kernels under batch sharding: each device runs them on its own batch shard.

XLA's SPMD partitioner has no rule for a Pallas call, so without `custom_partitioning` it
all-gathers q/k/v and every device runs the kernels on the global batch. Here, in a
subprocess with 4 simulated CPU devices (as in tests/test_parallel.py) and the kernels in
Pallas' interpreter: a batch-sharded jit computes the one-device forward and gradients (the
dropout mask follows the GLOBAL example index), its compiled HLO has no all-gather (the same
kernels without `custom_partitioning` do: the control), and the per-task backward
(`vmap` of the VJP, as in train_step) stays sharded too. BERT's form, the packed projection
with its replicated bias (`flash_attention_packed`), as well. Both partitioners: Shardy (the
default) and GSPMD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_use_shardy_partitioner", sys.argv[1] == "shardy")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mtjax.models import batch_parallel, flash_attention as flash
    from tests._support import compare_sharded, max_tree_diff

    assert jax.device_count() == 4, jax.devices()
    # L = 40 with 16-row tiles: the last tile overhangs L (masked); 2 examples per device.
    B, L, H, D, T, RATE = 8, 40, 2, 16, 3, 0.1
    blocks = flash.Blocks(16, 16, 16, 16)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (B, L, H, D)) for kk in keys[:3])
    cotangent = jax.random.normal(keys[3], (B, L, H, D))
    task_cotangents = jax.random.normal(keys[4], (T, B, L, H, D))
    seed = flash.seed_from_key(jax.random.key(7))

    def attention(q, k, v, seed):
        return flash.flash_attention(q, k, v, seed, RATE, blocks, True)

    def step(q, k, v, cotangent, seed):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seed), q, k, v)
        return out, vjp(cotangent)

    def reference_step(q, k, v, cotangent, seed):
        out, vjp = jax.vjp(lambda q, k, v: flash.attention_reference(q, k, v, seed, RATE), q, k, v)
        return out, vjp(cotangent)

    # BERT's form: the kernels read the packed projection; the (3, H, D) bias is replicated.
    kvq = jax.random.normal(keys[0], (B, L, 3, H, D))
    packed_bias = 0.5 * jax.random.normal(keys[1], (3, H, D))

    def packed_step(kvq, bias, cotangent, seed):
        out, vjp = jax.vjp(lambda kvq, bias: flash.flash_attention_packed(kvq, bias, seed, RATE, blocks, True),
                           kvq, bias)
        return out, vjp(cotangent)

    def per_task(q, k, v, cotangents, seed):  # train_step's batched backward
        _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seed), q, k, v)
        return jax.vmap(vjp)(cotangents)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    tasks_batch = NamedSharding(mesh, P(None, "data"))
    sharded = lambda x, s=batch: jax.device_put(x, s)

    out = {
        "step": compare_sharded(step, (q, k, v, cotangent, seed), (*map(sharded, (q, k, v, cotangent)), seed)),
        "packed_step": compare_sharded(packed_step, (kvq, packed_bias, cotangent, seed),
                                       (sharded(kvq), packed_bias, sharded(cotangent), seed)),
        "packed_bias_gradient_scale": float(jnp.max(jnp.abs(
            jax.jit(packed_step)(kvq, packed_bias, cotangent, seed)[1][1]))),
        "per_task": compare_sharded(per_task, (q, k, v, task_cotangents, seed),
                                    (*map(sharded, (q, k, v)), sharded(task_cotangents, tasks_batch), seed)),
        # The kernels are the written-out reference (so the comparisons above are not vacuous).
        "one_device_vs_reference": max_tree_diff(jax.jit(step)(q, k, v, cotangent, seed),
                                                 jax.jit(reference_step)(q, k, v, cotangent, seed)),
    }

    if sys.argv[1] == "shardy":
        # Control: the same kernels without custom_partitioning are gathered.
        class Unpartitioned:
            def __init__(self, fun):
                self.fun = fun
            def def_partition(self, *args, **kwargs):
                pass
            def __call__(self, *args):
                return self.fun(*args)
        batch_parallel.custom_partitioning = Unpartitioned
        for op in (flash._fwd_op, flash._dkdv_op, flash._dq_op):
            op.cache_clear()
        args = (*map(sharded, (q, k, v, cotangent)), seed)
        fresh = lambda *args: step(*args)  # not `step`: jit would reuse its cached trace
        out["control_all_gathers"] = jax.jit(fresh).lower(*args).compile().as_text().count("all-gather")
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module", params=["shardy", "gspmd"])
def result(request):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, request.param], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return request.param, json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["step", "packed_step", "per_task"])
def test_sharded_kernels_equal_one_device_without_gathering(result, case):
    _, r = result
    tolerance = 1e-6
    if case == "packed_step":  # the bias gradient (last) is a (3, H, D) sum: replicated
        assert not r[case]["split"].pop()
        # It sums B·L = 320 rows, per device and then across devices under sharding: float32
        # rounding relative to its size.
        tolerance = 1e-6 * max(1.0, r["packed_bias_gradient_scale"])
    # Forward and dq/dk/dv: the same function as on one device (float32 rounding only: XLA
    # may vectorise the per-shard arithmetic around the kernels differently).
    assert r[case]["diff"] <= tolerance, r[case]
    assert r[case]["all_gathers"] == 0
    assert all(r[case]["split"])
    # The one-device kernels compute the written-out reference (the comparison is not vacuous).
    assert r["one_device_vs_reference"] <= 3e-6


@pytest.mark.slow
def test_without_custom_partitioning_the_kernels_are_gathered(result):
    partitioner, r = result
    if partitioner != "shardy":
        pytest.skip("control run once")
    assert r["control_all_gathers"] > 0

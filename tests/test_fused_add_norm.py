"""The fused add-norm kernels (`bert.add_norm_impl='fused'`): dense bias → dropout → residual add → LayerNorm.

CI has no GPU: the kernels run in Pallas' interpreter (which fills block overhangs with NaN,
so a missing mask shows) against the written-out function with the same hash mask, and their
Triton lowering is produced for CUDA on the CPU. The GPU run of the comparison is
`python -m mtjax.bench_add_norm`.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mtjax.config import BertConfig, ConfigError, tiny_model_config
from mtjax.models import fused_add_norm as fused
from mtjax.models.attention import Dense
from mtjax.models.bert import BertAddNorm, LayerNormParams
from mtjax.models.dropout import Dropout
from mtjax.models.hiccap import HICCAP, MODEL_INPUTS, init_variables
from tests._support import random_batch

ROOT = Path(__file__).resolve().parents[1]


GRADIENTS = ("dy", "ddense_bias", "dresidual", "dscale", "dbias")


def _operands(shape, dtype=jnp.float32, seed=0):
    """y (the dense matmul output), the dense bias, the residual, the LayerNorm scale and bias."""
    ky, kd, kr, ks, kb = jax.random.split(jax.random.key(seed), 5)
    d = shape[-1]
    return (jax.random.normal(ky, shape, dtype), 0.5 * jax.random.normal(kd, (d,)), jax.random.normal(kr, shape, dtype),
            1.0 + 0.1 * jax.random.normal(ks, (d,)), 0.1 * jax.random.normal(kb, (d,)))


def _compare_with_the_written_out_function(shape, rate):
    operands = _operands(shape)
    seed = jnp.int32(1234)
    kernel = lambda *a: fused.add_dropout_layer_norm(*a, seed, rate, 1e-12, True)
    reference = lambda *a: fused.add_norm_reference(*a, seed, rate, 1e-12)
    out_k, vjp_k = jax.vjp(kernel, *operands)
    out_r, vjp_r = jax.vjp(reference, *operands)
    np.testing.assert_allclose(out_k, out_r, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(5), shape)
    for name, gk, gr in zip(GRADIENTS, vjp_k(cotangent), vjp_r(cotangent)):
        np.testing.assert_allclose(gk, gr, atol=2e-5, err_msg=name)
    if rate:
        # The mask is drawn: some dense outputs have no gradient, about `rate` of them.
        dropped = float(jnp.mean(vjp_k(cotangent)[0] == 0))
        assert 0.0 < dropped < 0.3


@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(2, 13, 24), (3, 8, 40)])  # rows and features off the tiles
def test_kernels_match_the_written_out_function(rate, shape):
    _compare_with_the_written_out_function(shape, rate)


def _rebuild_ops():
    fused._fwd_op.cache_clear(), fused._bwd_op.cache_clear()


@pytest.fixture
def launch(monkeypatch):
    """launch(rows, blocks): both kernels' rows per block and blocks per program for one test."""
    def set_launch(rows, blocks):
        monkeypatch.setattr(fused, "FORWARD", fused.Launch(rows, blocks))
        monkeypatch.setattr(fused, "BACKWARD", fused.Launch(rows, blocks))
        _rebuild_ops()

    yield set_launch
    _rebuild_ops()


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_programs_of_several_blocks_match_the_written_out_function(launch, rate):
    """Programs of 4 blocks of 4 rows over 37 rows: the third program's first block in the
    sequence, its second one row in, its last two past the end."""
    launch(rows=4, blocks=4)
    _compare_with_the_written_out_function((2, 37, 40), rate)


def test_forked_output_sums_two_cotangents_in_the_backward(launch):
    """forked=True: the output twice, each copy with its own cotangent; the backward kernel adds
    them (as add_any would) and gives the written-out function's gradients for their sum.
    Programs of 4 blocks of 4 rows over 37 rows, as above."""
    launch(rows=4, blocks=4)
    shape, rate, seed = (2, 37, 40), 0.1, jnp.int32(1234)
    operands = _operands(shape)
    forked = lambda *a: fused.add_dropout_layer_norm(*a, seed, rate, 1e-12, True, True)
    reference = lambda *a: fused.add_norm_reference(*a, seed, rate, 1e-12)
    (out_a, out_b), vjp_k = jax.vjp(forked, *operands)
    out_r, vjp_r = jax.vjp(reference, *operands)
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_allclose(out_a, out_r, atol=2e-6)
    c1, c2 = (jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(7), 2))
    for name, gk, gr in zip(GRADIENTS, vjp_k((c1, c2)), vjp_r(c1 + c2)):
        np.testing.assert_allclose(gk, gr, atol=2e-5, err_msg=name)


def test_forked_bf16_cotangents_are_summed_as_add_any_rounds():
    """In bf16 the forked backward equals the unforked one given the two cotangents' sum as
    autodiff's add_any forms it (float32 add, rounded to bf16), bit for bit."""
    operands = _operands((2, 21, 48), jnp.bfloat16, seed=3)
    seed = jnp.int32(-77)
    kernel = lambda forked: lambda *a: fused.add_dropout_layer_norm(*a, seed, 0.1, 1e-12, True, forked)
    _, vjp_f = jax.vjp(kernel(True), *operands)
    _, vjp_1 = jax.vjp(kernel(False), *operands)
    c1, c2 = (jax.random.normal(k, (2, 21, 48), jnp.bfloat16) for k in jax.random.split(jax.random.key(8), 2))
    summed = jax.grad(lambda h: jnp.vdot(h, c1) + jnp.vdot(h, c2))(operands[2])  # add_any's sum
    np.testing.assert_array_equal(summed, (c1.astype(jnp.float32) + c2.astype(jnp.float32)).astype(jnp.bfloat16))
    for name, gf, g1 in zip(GRADIENTS, vjp_f((c1, c2)), vjp_1(summed)):
        np.testing.assert_array_equal(gf, g1, err_msg=name)


def _partial_sums_shape(shape):
    b, l, d = shape
    x, stats, features = (jax.ShapeDtypeStruct(s, t) for s, t in
                          (((b, l, d), jnp.bfloat16), ((b, l), jnp.float32), ((d,), jnp.float32)))
    example = jax.ShapeDtypeStruct((b,), jnp.int32)
    outs = jax.eval_shape(fused._bwd_op(0.1, False), example, example, x, x, stats, stats, features)
    assert len(outs) == 3  # dy, dr and the one stacked output of the three partial sums
    return outs[2].shape


def test_the_backward_stores_one_partial_sum_per_program(launch):
    """The parameter gradients' partial sums are summed across each program's blocks and
    stacked: XLA reduces (B, ⌈L / (rows · blocks)⌉, 3, D) once, not one row per block of
    rows, nor three arrays."""
    # BERT's shape, the module's settings: several blocks per program.
    rows_per_program = fused.BACKWARD.rows * fused.BACKWARD.blocks
    assert _partial_sums_shape((32, 500, 768)) == (32, -(-500 // rows_per_program), 3, 768)
    assert rows_per_program > fused.BACKWARD.rows
    launch(rows=4, blocks=4)
    assert _partial_sums_shape((2, 37, 40)) == (2, 3, 3, 40)


def test_bf16_follows_the_written_out_roundings():
    operands = _operands((2, 21, 48), jnp.bfloat16, seed=3)
    seed = jnp.int32(-77)
    out_k, vjp_k = jax.vjp(lambda *a: fused.add_dropout_layer_norm(*a, seed, 0.1, 1e-12, True), *operands)
    out_r, vjp_r = jax.vjp(lambda *a: fused.add_norm_reference(*a, seed, 0.1, 1e-12), *operands)
    assert out_k.dtype == jnp.bfloat16
    # Same bf16 sums, float32 statistics in another summation order: at most one bf16 step.
    np.testing.assert_allclose(out_k.astype(jnp.float32), out_r.astype(jnp.float32), rtol=8e-3, atol=8e-3)
    assert float(jnp.mean(out_k == out_r)) > 0.95
    cotangent = jax.random.normal(jax.random.key(6), out_k.shape, jnp.bfloat16)
    grads_k, grads_r = vjp_k(cotangent), vjp_r(cotangent)
    assert grads_k[0].dtype == jnp.bfloat16 and grads_k[1].dtype == jnp.float32
    for name, gk, gr in zip(GRADIENTS, grads_k, grads_r):
        gk, gr = gk.astype(jnp.float32), gr.astype(jnp.float32)
        # bf16 cotangents a bf16 step apart where the float32 statistics round differently;
        # the parameter gradients sum such terms over the 42 rows in float32.
        atol = 1e-2 * float(jnp.max(jnp.abs(gr))) if gr.ndim == 1 else 0.0
        np.testing.assert_allclose(gk, gr, rtol=8e-3, atol=atol, err_msg=name)


class _DenseThenKernel(nn.Module):
    """BertAddNorm's fused path as it was before the kernel added the dense bias: `Dense`
    with its bias, then the kernel adding a zero bias (exact: y + 0 is y)."""

    config: BertConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, residual, *, deterministic):
        c = self.config
        y = Dense(c.hidden_size, dtype=self.dtype, name="dense")(x)
        rate = 0.0 if deterministic else c.hidden_dropout_prob
        seed = Dropout(c.hidden_dropout_prob, impl="hash").hash_seed() if rate > 0 else jnp.int32(0)
        scale, bias = LayerNormParams(name="LayerNorm")(c.hidden_size)
        return fused.add_dropout_layer_norm(y, jnp.zeros(c.hidden_size), residual.astype(y.dtype), scale, bias,
                                            seed, rate, c.layer_norm_eps, True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_dense_bias_added_in_the_kernel_is_dense_s(monkeypatch, dtype):
    """BertAddNorm's fused path (Dense's matmul, the bias added in the kernel) against Dense
    with its bias and then the kernel: the same output bit for bit, the same input, residual,
    dense kernel and LayerNorm gradients, and the dense bias gradient summed in float32 in
    another order."""
    monkeypatch.setattr(fused, "use_fused_kernels", lambda x: True)
    monkeypatch.setattr(fused, "INTERPRET", True)
    config = _configs()[1].bert
    d = config.hidden_size
    fused_path, dense_then_kernel = BertAddNorm(config, dtype), _DenseThenKernel(config, dtype)
    kx, kr, kp, kb = jax.random.split(jax.random.key(8), 4)
    x = jax.random.normal(kx, (2, 13, config.intermediate_size), dtype)
    residual = jax.random.normal(kr, (2, 13, d), dtype)
    params = fused_path.init(kp, x, residual, deterministic=True)["params"]
    assert jax.tree.structure(dense_then_kernel.init(kp, x, residual, deterministic=True)["params"]) \
        == jax.tree.structure(params)
    b1, b2, b3 = jax.random.split(kb, 3)
    params = {"dense": {**params["dense"], "bias": 0.5 * jax.random.normal(b1, (d,))},
              "LayerNorm": {"scale": 1.0 + 0.1 * jax.random.normal(b2, (d,)),
                            "bias": 0.1 * jax.random.normal(b3, (d,))}}
    rngs = {"dropout": jax.random.key(3)}
    cotangent = jax.random.normal(jax.random.key(4), residual.shape, dtype)
    results = []
    for module in (fused_path, dense_then_kernel):
        out, vjp = jax.vjp(lambda p, x, r: module.apply({"params": p}, x, r, deterministic=False, rngs=rngs),
                           params, x, residual)
        results.append((out, *vjp(cotangent)))
    (out_f, grads_f, dx_f, dr_f), (out_d, grads_d, dx_d, dr_d) = results
    assert out_f.dtype == dtype
    np.testing.assert_array_equal(out_f, out_d)
    # Dropout ran (with the same mask in both, or the outputs would differ).
    assert not np.array_equal(out_f, fused_path.apply({"params": params}, x, residual, deterministic=True))
    exact = {"dx": (dx_f, dx_d), "dresidual": (dr_f, dr_d),
             "dkernel": (grads_f["dense"]["kernel"], grads_d["dense"]["kernel"]),
             "dLayerNorm": (grads_f["LayerNorm"], grads_d["LayerNorm"])}
    for name, (gf, gd) in exact.items():
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name), gf, gd)
    db_f, db_d = grads_f["dense"]["bias"], grads_d["dense"]["bias"]
    assert db_f.dtype == db_d.dtype == jnp.float32
    np.testing.assert_allclose(db_f, db_d, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(db_d))))


def test_the_mask_is_the_hash_dropout_modules():
    """With the module's seed, the kernel drops exactly what `Dropout(impl='hash')` drops."""
    y = jnp.ones((2, 9, 16))
    module = Dropout(0.3, impl="hash")
    rngs = {"dropout": jax.random.key(11)}
    dropped_by_module = module.apply({}, y, deterministic=False, rngs=rngs) == 0
    seed = module.apply({}, method=Dropout.hash_seed, rngs=rngs)
    zeros = jnp.zeros_like(y)
    # With a zero residual the cotangent of y is zero exactly where the mask drops.
    _, vjp = jax.vjp(lambda y: fused.add_dropout_layer_norm(y, jnp.full(16, 0.1), zeros, jnp.ones(16), jnp.zeros(16),
                                                              seed, 0.3, 1e-12, True),
                     y + jax.random.normal(jax.random.key(2), y.shape))
    dy = vjp(jax.random.normal(jax.random.key(3), y.shape))[0]
    np.testing.assert_array_equal(dy == 0, dropped_by_module)


def test_triton_lowering_for_cuda():
    y = jax.ShapeDtypeStruct((2, 500, 768), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((768,), jnp.float32)

    def loss(y, dense_bias, r, scale, bias, seed):
        return fused.add_dropout_layer_norm(y, dense_bias, r, scale, bias, seed, 0.1, 1e-12).astype(jnp.float32).sum()

    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(y, p, y, p, p, jax.ShapeDtypeStruct((), jnp.int32))
    text = exported.mlir_module()
    for name in ("add_norm_fwd", "add_norm_bwd"):
        assert f'name = "{name}"' in text


def _configs():
    base = tiny_model_config(text_len=24)
    hashed = base.replace(bert=dataclasses.replace(base.bert, hidden_dropout_impl="hash"))
    return hashed, hashed.replace(bert=dataclasses.replace(hashed.bert, add_norm_impl="fused"))


def test_model_with_fused_add_norm_trains_as_the_hash_dropout_model(monkeypatch):
    """The model path: same parameters, same masks, same outputs and gradients (the kernels
    interpreted on the CPU)."""
    monkeypatch.setattr(fused, "use_fused_kernels", lambda x: True)
    monkeypatch.setattr(fused, "INTERPRET", True)
    written, with_kernels = _configs()
    variables = init_variables(written, jax.random.key(0))
    assert jax.tree.structure(init_variables(with_kernels, jax.random.key(0))) == jax.tree.structure(variables)
    # The add-norms' dense biases (which the kernel adds) random, as after training: initialised,
    # they are zero and a kernel that dropped them would compute the same.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    dense_biases = [jax.tree_util.keystr(path) for path, _ in leaves
                    if jax.tree_util.keystr(path).endswith("['output']['dense']['bias']")]
    assert len(dense_biases) == 2 * written.bert.num_hidden_layers
    params = treedef.unflatten([
        x + 0.2 * jax.random.normal(key, x.shape) if jax.tree_util.keystr(path) in dense_biases else x
        for (path, x), key in zip(leaves, jax.random.split(jax.random.key(1), len(leaves)))])
    batch = random_batch(written, 2, seed=4)
    inputs = {k: batch[k] for k in MODEL_INPUTS}

    def loss(config, params):
        probs, _ = HICCAP(config).apply({**variables, "params": params}, inputs, train=True,
                                        rngs={"dropout": jax.random.key(9)}, mutable=["batch_stats"])
        # Not Σ probs (constant: each clip's two probabilities sum to 1, the gradient is noise).
        return sum(jnp.sum(jnp.log(p[:, 1]) * (i + 1)) for i, p in enumerate(probs.values()))

    value_w, grads_w = jax.value_and_grad(lambda p: loss(written, p))(params)
    value_k, grads_k = jax.value_and_grad(lambda p: loss(with_kernels, p))(params)
    np.testing.assert_allclose(value_k, value_w, rtol=1e-6)
    # A kernel that dropped the add-norms' dense biases, or added them twice, fails the above.
    for factor in (0.0, 2.0):
        changed = jax.tree_util.tree_map_with_path(
            lambda path, x: factor * x if jax.tree_util.keystr(path) in dense_biases else x, params)
        assert abs(float(loss(written, changed)) - float(value_w)) > 1e-4 * abs(float(value_w)), factor
    assert jax.tree.structure(grads_k) == jax.tree.structure(grads_w)
    g_max = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_w))
    for (path, gk), gw in zip(jax.tree_util.tree_leaves_with_path(grads_k), jax.tree.leaves(grads_w)):
        diff = float(jnp.max(jnp.abs(gk - gw)))
        # float32; the kernels' two-pass variance and LayerNorm backward round differently from
        # flax's LayerNorm (measured: ≤ 1.6e-4 of each BERT leaf's largest gradient with these
        # dense biases and this mask — 4.7e-5 with the earlier per-element hash's, which dropped
        # other elements — ≤ 1.5e-5 with zero biases), and the heads' train-mode BatchNorm over
        # 2 clips amplifies that (≤ 8e-6 of the largest gradient). A wrong mask or bias moves
        # the loss itself far past its 1e-6 above.
        # (The attention key bias has no gradient in exact arithmetic: a floor for such leaves.)
        if "bert" in jax.tree_util.keystr(path):
            leaf_scale = max(float(jnp.max(jnp.abs(gw))), 1e-4 * g_max)
            assert diff <= 3e-4 * leaf_scale, (jax.tree_util.keystr(path), diff)
        assert diff <= 1e-4 * g_max, (jax.tree_util.keystr(path), diff)


def test_eval_of_a_threefry_model_with_fused_add_norm(monkeypatch):
    """predict/evaluate's --add-norm fused on a model trained with the threefry mask: valid
    (eval draws no mask) and the same eval outputs, the kernels interpreted."""
    monkeypatch.setattr(fused, "use_fused_kernels", lambda x: True)
    monkeypatch.setattr(fused, "INTERPRET", True)
    config = tiny_model_config(text_len=24)
    assert config.bert.hidden_dropout_impl == "threefry"
    with_kernels = config.with_add_norm_impl("fused")
    assert with_kernels.bert.add_norm_impl == "fused" and config.with_add_norm_impl(None) is config
    variables = init_variables(config, jax.random.key(0))
    inputs = {k: v for k, v in random_batch(config, 3, seed=2).items() if k in MODEL_INPUTS}
    written = HICCAP(config).apply(variables, inputs, train=False)
    fused_out = HICCAP(with_kernels).apply(variables, inputs, train=False)
    for task in config.tasks:
        np.testing.assert_allclose(fused_out[task], written[task], atol=1e-5)


def test_fused_add_norm_needs_the_hash_mask():
    base = tiny_model_config(text_len=24)
    with pytest.raises(ConfigError, match="hidden_dropout_impl='hash'"):
        base.replace(bert=dataclasses.replace(base.bert, add_norm_impl="fused"))
    with pytest.raises(ConfigError, match="add_norm_impl"):
        base.replace(bert=dataclasses.replace(base.bert, add_norm_impl="triton"))


SHARDING_SCRIPT = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mtjax.models import fused_add_norm as fused
    from tests._support import compare_sharded

    B, L, D, T, RATE = 8, 13, 24, 3, 0.1   # 2 examples per device
    keys = jax.random.split(jax.random.key(0), 4)
    y, r = (jax.random.normal(k, (B, L, D)) for k in keys[:2])
    dense_bias, scale, bias = jnp.linspace(-0.5, 0.5, D), 1.0 + 0.1 * jnp.arange(D) / D, jnp.full((D,), 0.1)
    cotangent = jax.random.normal(keys[2], (B, L, D))
    task_cotangents = jax.random.normal(keys[3], (T, B, L, D))
    seed = jnp.int32(99)
    add_norm = lambda y, db, r, s, b: fused.add_dropout_layer_norm(y, db, r, s, b, seed, RATE, 1e-12, True)

    def step(y, r, cotangent):
        out, vjp = jax.vjp(add_norm, y, dense_bias, r, scale, bias)
        return out, vjp(cotangent)

    def per_task(y, r, cotangents):  # train_step's batched backward
        _, vjp = jax.vjp(add_norm, y, dense_bias, r, scale, bias)
        return jax.vmap(vjp)(cotangents)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch, tasks_batch = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))

    print("RESULT " + json.dumps({
        "step": compare_sharded(step, (y, r, cotangent), [jax.device_put(x, batch) for x in (y, r, cotangent)]),
        "per_task": compare_sharded(per_task, (y, r, task_cotangents),
                                    [jax.device_put(y, batch), jax.device_put(r, batch),
                                     jax.device_put(task_cotangents, tasks_batch)]),
    }))
""")


@pytest.mark.slow
def test_sharded_kernels_equal_one_device_without_gathering():
    """4 simulated CPU devices, batch-sharded: each device runs the kernels on its examples
    with the masks one device draws for them (the index base is global), nothing gathered."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    for case in ("step", "per_task"):
        # float32 rounding only: the parameter-gradient partial sums add up in another order.
        assert result[case]["diff"] <= 1e-5, result
        assert result[case]["all_gathers"] == 0, result
    assert result["step"]["split"][0]  # the add-norm output; the parameter gradients are (D,)


def test_vmap_over_a_per_feature_operand_runs_one_call_per_slice():
    """The per-feature operands (D,) are not folded into the batch under vmap; when one of them
    is batched anyway (here the LayerNorm scale), `batch_parallel` runs the kernels once per
    slice, and each slice is the unbatched call."""
    y, dense_bias, residual, scale, bias = _operands((2, 13, 24))
    scales = scale * jnp.array([1.0, 0.5, 2.0])[:, None]
    seed = jnp.int32(9)
    call = lambda s: fused.add_dropout_layer_norm(y, dense_bias, residual, s, bias, seed, 0.1, 1e-12, True)
    batched = jax.vmap(call)(scales)
    for i, s in enumerate(scales):
        np.testing.assert_allclose(batched[i], call(s), atol=1e-6)
    # The scale matters, so the slices differ.
    assert float(jnp.max(jnp.abs(batched[0] - batched[2]))) > 0.1

"""The persistent LSTM kernels (`model.lstm_impl='kernel'`, `mtjax.models.lstm_kernel`).

CI has no GPU: the kernels run in Pallas' interpreter (one program per direction there, so
the barrier is passed at once) against the scan (`lstm.recurrence`), and their Triton
lowering is produced for CUDA on the CPU. The GPU run of the comparison, with 128 programs
meeting at the barrier every step, is `python -m mtjax.bench_lstm`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mtjax.config import ConfigError, tiny_model_config
from mtjax.models import lstm, lstm_kernel
from mtjax.models.hiccap import HICCAP, init_variables
from tests._support import random_batch

B, T, Z, H = 3, 5, 4, 16


def _operands(seed=0):
    """Scan-layout operands: projected (T, Z, B, 4H), w_hh (Z, H, 4H), b_hh (Z, 4H)."""
    kp, kw, kb = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kp, (T, Z, B, 4 * H)), 0.2 * jax.random.normal(kw, (Z, H, 4 * H)),
            0.1 * jax.random.normal(kb, (Z, 4 * H)))


def _kernel_in_scan_layout(dtype):
    """lstm_kernel.recurrence taking and returning the scan's layouts and gate order."""
    def run(projected, w_hh, b_hh):
        to_kernel = lstm_kernel.to_kernel_order
        hs = lstm_kernel.recurrence(to_kernel(jnp.transpose(projected, (2, 0, 1, 3))), to_kernel(w_hh),
                                    to_kernel(b_hh), dtype)
        return jnp.transpose(hs, (1, 2, 0, 3))
    return run


@pytest.mark.parametrize("dtype, atol", [
    (jnp.float32, 1e-5),
    # bf16: the h·W_hh product is rounded to bf16 as in the scan, but accumulated in another
    # order (and the sigmoid is 1/(1+exp(-x)), not XLA's logistic): a product near a rounding
    # boundary rounds the other way, one bf16 ulp (2^-8 relative) of values up to ~3.
    (jnp.bfloat16, 1e-2),
])
def test_kernels_compute_the_scans_outputs_and_gradients(monkeypatch, dtype, atol):
    monkeypatch.setattr(lstm_kernel, "INTERPRET", True)
    operands = _operands()
    out_s, vjp_s = jax.vjp(lambda *a: lstm.recurrence(*a, dtype), *operands)
    out_k, vjp_k = jax.vjp(_kernel_in_scan_layout(dtype), *operands)
    np.testing.assert_allclose(out_k, out_s, atol=atol)
    cotangent = jax.random.normal(jax.random.key(7), out_s.shape)
    for name, gk, gs in zip(("dprojected", "dw_hh", "db_hh"), vjp_k(cotangent), vjp_s(cotangent)):
        np.testing.assert_allclose(gk, gs, atol=atol * float(jnp.max(jnp.abs(gs))), err_msg=name)


def test_kernel_order_puts_each_programs_gates_together(monkeypatch):
    """Program j's columns: units [16j, 16j + 16) of gate i, then of f, g, o — and the order is
    a permutation (a transpose, so its gradient is one too)."""
    monkeypatch.setattr(lstm_kernel, "INTERPRET", False)
    hidden = 32
    order = np.asarray(lstm_kernel.to_kernel_order(jnp.arange(4 * hidden)))
    assert sorted(order) == list(range(4 * hidden))
    first_program = np.concatenate([np.arange(16) + gate * hidden for gate in range(4)])
    np.testing.assert_array_equal(order[:64], first_program)
    np.testing.assert_array_equal(order[64:], first_program + 16)


def test_under_vmap_the_kernels_run_once_per_slice(monkeypatch):
    """Per-task gradients (vmap over cotangents, as train_step's gradient-surgery strategies
    take them): the kernel's equal the scan's, and the batched backward is two calls of the
    kernel, not one call on a grid grown by the vmapped axis (more programs than the barrier
    lets be resident)."""
    monkeypatch.setattr(lstm_kernel, "INTERPRET", True)
    operands = _operands(1)
    cotangents = jax.random.normal(jax.random.key(3), (2, T, Z, B, H))
    grads = {}
    for name, fn in (("scan", lambda *a: lstm.recurrence(*a, jnp.float32)),
                     ("kernel", _kernel_in_scan_layout(jnp.float32))):
        _, vjp = jax.vjp(fn, *operands)
        grads[name] = jax.vmap(vjp)(cotangents)
        if name == "kernel":
            jaxpr = str(jax.make_jaxpr(jax.vmap(vjp))(cotangents))
            assert jaxpr.count("pallas_call") == 2
    jax.tree.map(lambda k, s: np.testing.assert_allclose(k, s, atol=1e-5), grads["kernel"], grads["scan"])


def test_which_calls_the_kernels_take(monkeypatch):
    monkeypatch.setattr(lstm_kernel, "INTERPRET", False)
    # On the CPU: none (the model runs the scan).
    bf16 = jnp.bfloat16
    assert not lstm_kernel.supported(32, 4, 512, bf16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(lstm_kernel, "_multiprocessors", lambda: 132)  # the H100's
    assert lstm_kernel.supported(32, 4, 512, bf16)            # HICCAP's: 128 programs
    assert lstm_kernel.supported(5, 4, 512, jnp.float16)      # padded to 16
    assert not lstm_kernel.supported(32, 4, 512, jnp.float32)  # tiles twice the size
    assert not lstm_kernel.supported(33, 4, 512, bf16)        # beyond the tiles
    assert not lstm_kernel.supported(32, 6, 512, bf16)        # 192 programs: not all resident
    assert not lstm_kernel.supported(32, 4, 40, bf16)         # not whole power-of-two slices
    monkeypatch.setattr(lstm_kernel, "_multiprocessors", lambda: 108)  # an A100's
    assert not lstm_kernel.supported(32, 4, 512, bf16)


def test_model_with_the_kernels_equals_the_model_with_the_scan(monkeypatch):
    """HICCAP with lstm_impl='kernel' (the video and audio LSTMs in one kernel call per layer
    and direction of time): the same parameters, outputs and gradients as with the scan."""
    monkeypatch.setattr(lstm_kernel, "INTERPRET", True)
    config = tiny_model_config(lstm_hidden=16, lstm_layers=2)
    batch = random_batch(config, 3, seed=2)
    variables = init_variables(config, jax.random.key(0))
    results = {}
    for impl in ("scan", "kernel"):
        model = HICCAP(config.replace(lstm_impl=impl))
        loss = lambda p: sum(jnp.sum(jnp.log(v[:, 1])) for v in model.apply(
            {**variables, "params": p}, batch, deterministic=True).values())
        results[impl] = jax.value_and_grad(loss)(variables["params"])
        # The kernel config runs the kernels (one forward call per layer), the scan config none.
        calls = str(jax.make_jaxpr(loss)(variables["params"])).count("pallas_call")
        assert calls == (config.lstm_layers if impl == "kernel" else 0)
    (loss_s, grads_s), (loss_k, grads_k) = results["scan"], results["kernel"]
    assert jax.tree.structure(grads_s) == jax.tree.structure(grads_k)
    np.testing.assert_allclose(loss_k, loss_s, rtol=1e-6)
    jax.tree.map(lambda k, s: np.testing.assert_allclose(k, s, atol=1e-5), grads_k, grads_s)


def test_lstm_impl_is_checked():
    with pytest.raises(ConfigError, match="lstm_impl"):
        tiny_model_config(lstm_impl="cudnn")


def test_triton_lowering_for_cuda(monkeypatch):
    monkeypatch.setattr(lstm_kernel, "INTERPRET", False)
    projected = jax.ShapeDtypeStruct((32, 63, 4, 2048), jnp.float32)

    def loss(projected, w_hh, b_hh):
        return lstm_kernel.recurrence(projected, w_hh, b_hh, jnp.bfloat16).sum()

    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(projected, jax.ShapeDtypeStruct((4, 512, 2048), jnp.float32), jax.ShapeDtypeStruct((4, 2048), jnp.float32))
    text = exported.mlir_module()
    for name in ("_forward_kernel", "_backward_kernel"):
        assert f'name = "{name}"' in text

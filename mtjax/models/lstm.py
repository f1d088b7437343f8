"""A bidirectional multi-layer LSTM equal to `torch.nn.LSTM(batch_first=True, bidirectional=True)`.

Same structure as PyTorch: gates ordered (i, f, g, o), two biases (`bias_ih`, `bias_hh`)
added separately, layer k+1 reads the concatenation [forward, backward] of layer k, no
packing (the padded rows are run through like any other, as in the original).

Parameters per layer: `weight_ih` (2, in, 4H), `weight_hh` (2, H, 4H), `bias_ih` (2, 4H),
`bias_hh` (2, 4H); index 0 is the forward direction, 1 the backward (`*_reverse` in
PyTorch), kernels stored (in, out) i.e. transposed from PyTorch.

For speed the input projection of all time steps is one matmul, and both directions
advance in one `lax.scan` (the backward direction scans the time-reversed input), so the
recurrence is the only sequential part. Its gradient is written by hand (`recurrence`,
a `jax.custom_vjp`): the reverse scan computes only the gate gradients (one small matmul
per step) and the recurrent weight gradient is one matmul over all steps afterwards,
where autodiff of the scan would accumulate it step by step (see docs/perf_notes.md).
With `impl='kernel'` (`ModelConfig.lstm_impl`) the recurrence runs instead as one
persistent GPU kernel per scan (`lstm_kernel`), where the kernels take the call; the
layouts are then batch-first and the gate columns in the kernels' order (a transpose of the
parameters' columns, so the parameters themselves keep PyTorch's layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.models import lstm_kernel

# The scan's gradient: "custom_vjp" (hand-written backward, the default) or "autodiff"
# (jax.grad of the scan); the same function and gradient, kept switchable for benchmarks and
# tests. (The modules' `impl='kernel'` runs `lstm_kernel` instead of the scan.)
RECURRENCE = "custom_vjp"
# `lax.scan(unroll=...)` of the recurrence (forward and backward).
SCAN_UNROLL = 4
# `run_together` runs several BiLSTMs' recurrences in one scan (True) or one after the other.
JOINT_SCAN = True


def _torch_lstm_init(hidden: int):
    bound = 1.0 / jnp.sqrt(hidden)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _gates(a: jax.Array):
    i, f, g, o = jnp.split(a, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _scan(projected, w_hh, b_hh, dtype, *, save: bool):
    """The recurrence over (T, Z, B, 4H) projected inputs (Z directions); returns hs
    (T, Z, B, H), plus (cs, activations) for the backward pass when `save`."""
    w = w_hh.astype(dtype)
    _, z, b, h4 = projected.shape

    def step(carry, proj_t):
        h, c = carry  # (Z, B, H) each, float32
        gates = proj_t + jnp.einsum("zbh,zhg->zbg", h.astype(dtype), w).astype(jnp.float32) + b_hh[:, None, :]
        i, f, g, o = _gates(gates)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), ((h, c, jnp.concatenate([i, f, g, o], axis=-1)) if save else h)

    zeros = jnp.zeros((z, b, h4 // 4), jnp.float32)
    _, out = jax.lax.scan(step, (zeros, zeros), projected, unroll=SCAN_UNROLL)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recurrence(projected, w_hh, b_hh, dtype):
    """LSTM recurrence: gates_t = projected_t + h_{t-1}·W_hh + b_hh, (i, f, g, o) gates,
    c_t = f·c_{t-1} + i·g, h_t = o·tanh(c_t), from zero states; returns hs (T, Z, B, H).
    `w_hh` (Z, H, 4H) float32 is cast to `dtype` for the matmul; the rest is float32."""
    return _scan(projected, w_hh, b_hh, dtype, save=False)


def _recurrence_fwd(projected, w_hh, b_hh, dtype):
    hs, cs, acts = _scan(projected, w_hh, b_hh, dtype, save=True)
    return hs, (w_hh, hs, cs, acts)


def _recurrence_bwd(dtype, res, dhs):
    w_hh, hs, cs, acts = res
    w = w_hh.astype(dtype)
    zero = jnp.zeros_like(hs[:1])
    h_prev = jnp.concatenate([zero, hs[:-1]])
    c_prev = jnp.concatenate([zero, cs[:-1]])

    def step(carry, xs):
        dh_rec, dc_next = carry            # from step t+1: through h_t and c_t
        dh_out, c_t, c_p, a = xs
        i, f, g, o = jnp.split(a, 4, axis=-1)
        dh = dh_out + dh_rec
        tc = jnp.tanh(c_t)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dgates = jnp.concatenate([dc * g * i * (1.0 - i), dc * c_p * f * (1.0 - f),
                                  dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=-1)
        dh_rec = jnp.einsum("zbg,zhg->zbh", dgates.astype(dtype), w).astype(jnp.float32)
        return (dh_rec, dc * f), dgates

    zeros = jnp.zeros_like(hs[0])
    _, dgates = jax.lax.scan(step, (zeros, zeros), (dhs, cs, c_prev, acts), reverse=True, unroll=SCAN_UNROLL)
    # The recurrent weight's gradient over all steps at once (T·B rows): operands in the
    # compute dtype, float32 accumulation, as every other weight gradient of the step.
    d_w = jnp.einsum("tzbh,tzbg->zhg", h_prev.astype(dtype), dgates.astype(dtype),
                     preferred_element_type=jnp.float32).astype(w_hh.dtype)
    return dgates, d_w, jnp.sum(dgates, axis=(0, 2))


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _use_kernel(impl: str, batch: int, directions: int, hidden: int, dtype) -> bool:
    """Whether a recurrence call of `directions` directions runs as `lstm_kernel`'s
    persistent kernels (batch-first layouts, gate columns in the kernels' order): with
    impl 'kernel', where the kernels take the call; otherwise as a scan."""
    return impl == "kernel" and lstm_kernel.supported(batch, directions, hidden, dtype)


def _recurrences(parts, dtype, kernel: bool) -> list[jax.Array]:
    """The recurrences of one or several layers (each `(projected (T, 2, B, 4H), w_hh, b_hh)`)
    as one: stacked on the direction axis, the shorter ones padded in time at the end of their
    scan order. Padded steps come after every real step (in both directions: the backward one
    scans its reversed input), so they change no real output, and their outputs' zero
    cotangents give them zero gradients. Returns each layer's hs (T_i, 2, B, H). With
    `kernel`, in `lstm_kernel`'s batch-first layouts: projected (B, T, 2, 4H), hs (B, T_i, 2, H)."""
    w_hh = jnp.concatenate([w for _, w, _ in parts])
    b_hh = jnp.concatenate([b for _, _, b in parts])
    if kernel:
        steps = max(p.shape[1] for p, _, _ in parts)
        projected = jnp.concatenate([jnp.pad(p, ((0, 0), (0, steps - p.shape[1]), (0, 0), (0, 0)))
                                     for p, _, _ in parts], axis=2)
        hs = lstm_kernel.recurrence(projected, w_hh, b_hh, dtype)
        return [hs[:, :p.shape[1], 2 * n:2 * n + 2] for n, (p, _, _) in enumerate(parts)]
    steps = max(p.shape[0] for p, _, _ in parts)
    projected = jnp.concatenate([jnp.pad(p, ((0, steps - p.shape[0]), (0, 0), (0, 0), (0, 0)))
                                 for p, _, _ in parts], axis=1)
    if RECURRENCE == "custom_vjp":
        hs = recurrence(projected, w_hh, b_hh, dtype)
    else:
        hs = _scan(projected, w_hh, b_hh, dtype, save=False)
    return [hs[:p.shape[0], 2 * n:2 * n + 2] for n, (p, _, _) in enumerate(parts)]


def _layer_output(hs: jax.Array, dtype, kernel: bool) -> jax.Array:
    """hs (T, 2, B, H) in scan order (batch-first: (B, T, 2, H)) → (B, T, 2H): [forward,
    backward] at each time step."""
    if kernel:
        return jnp.concatenate([hs[:, :, 0], hs[:, ::-1, 1]], axis=-1).astype(dtype)
    forward = jnp.swapaxes(hs[:, 0], 0, 1)
    backward = jnp.swapaxes(hs[::-1, 1], 0, 1)
    return jnp.concatenate([forward, backward], axis=-1).astype(dtype)


class BiLSTMLayer(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "scan"  # ModelConfig.lstm_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _use_kernel(self.impl, x.shape[0], 2, self.hidden, self.dtype)
        return _layer_output(_recurrences([self.project(x, kernel)], jnp.dtype(self.dtype), kernel)[0],
                             self.dtype, kernel)

    @nn.compact
    def project(self, x: jax.Array, kernel: bool = False):
        """The parallel part: every time step's input projection for both directions,
        (T, 2, B, 4H) in scan order (batch-first: (B, T, 2, 4H)), with the recurrence's
        parameters (w_hh, b_hh). For the `kernel` the gate columns of all four are in
        `lstm_kernel`'s order."""
        batch, _, in_dim = x.shape
        h4 = 4 * self.hidden
        init = _torch_lstm_init(self.hidden)
        # Matmul operands in the compute dtype; biases, gate pre-activations and the cell
        # state in float32 (each product is rounded once, the sums are not). The casts sit
        # after the einsums because XLA:CPU has no bf16 x bf16 -> f32 dot.
        f32 = jnp.float32
        w_ih = self.param("weight_ih", init, (2, in_dim, h4)).astype(self.dtype)
        w_hh = self.param("weight_hh", init, (2, self.hidden, h4))  # cast inside the recurrence
        b_ih = self.param("bias_ih", init, (2, h4)).astype(f32)
        b_hh = self.param("bias_hh", init, (2, h4)).astype(f32)

        x = x.astype(self.dtype)
        both = jnp.stack([x, x[:, ::-1]])  # (2, B, T, in): backward reads time reversed
        if kernel:
            w_ih, w_hh, b_ih, b_hh = (lstm_kernel.to_kernel_order(a) for a in (w_ih, w_hh, b_ih, b_hh))
            return jnp.einsum("zbti,zig->btzg", both, w_ih).astype(f32) + b_ih, w_hh, b_hh
        projected = (jnp.einsum("zbti,zig->tzbg", both, w_ih).astype(f32)
                     + b_ih[None, :, None, :])
        return projected, w_hh, b_hh


class BiLSTM(nn.Module):
    """(B, T, in) → (B, T, 2H): the output sequence of the last layer."""

    hidden: int
    num_layers: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "scan"  # ModelConfig.lstm_impl: 'scan' or 'kernel'

    def setup(self):
        self.layers = [BiLSTMLayer(self.hidden, self.dtype, self.impl, name=f"layer_{k}")
                       for k in range(self.num_layers)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


def run_together(lstms: list[BiLSTM], inputs: list[jax.Array]) -> list[jax.Array]:
    """`[lstm(x) for lstm, x in zip(lstms, inputs)]`, with the recurrences of each layer in one
    scan: the sequential steps are those of the longest input, not the sum (HICCAP's video and
    audio LSTMs: 63 steps per layer instead of 36 + 63). The recurrence is latency-bound, so a
    step over four directions costs about what one over two does. Needs the same batch size,
    hidden size, depth, dtype and impl; otherwise (or with `JOINT_SCAN` off) runs them one by one."""
    first = lstms[0]
    same = lambda m: (m.hidden, m.num_layers, m.dtype, m.impl)
    joint = JOINT_SCAN and len({x.shape[0] for x in inputs}) == 1 and all(same(m) == same(first) for m in lstms)
    if not joint:
        return [lstm(x) for lstm, x in zip(lstms, inputs)]
    xs = list(inputs)
    kernel = _use_kernel(first.impl, xs[0].shape[0], 2 * len(lstms), first.hidden, first.dtype)
    for k in range(first.num_layers):
        parts = [lstm.layers[k].project(x, kernel) for lstm, x in zip(lstms, xs)]
        xs = [_layer_output(hs, first.dtype, kernel) for hs in _recurrences(parts, jnp.dtype(first.dtype), kernel)]
    return xs

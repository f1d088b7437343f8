"""BERT's add-norm (dense bias → dropout → + residual → LayerNorm) alone on the GPU: fused kernels vs written out.

    python -m mtjax.bench_add_norm [--batch 32] [--seq 500] [--width 768] [--rows 2,4,8] [--blocks 4,8,16]
        [--warps 4,8]

First checks the kernels on this GPU against `add_norm_reference` with the same hash mask
and a nonzero dense bias (float32 operands, then bf16), then times forward and forward +
backward of one add-norm in bf16 with dropout 0.1 (its dense bias and its gradient included),
written out by XLA and fused at each launch setting (`fused_add_norm.Launch`: rows per
block, blocks per program, warps; given to both kernels). Wall times of a call move by more
than the settings do, so each setting's two kernels are also profiled: their GPU time per
call, the forward's and the backward's apart (the module takes a setting for each,
`FORWARD` and `BACKWARD`). The check runs the module's settings.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp

from mtjax.bench import (kernel_bench_parser, kernel_row, on_gpu, print_kernel_table, profiled_kernel_ms,
                         time_forward_and_grad)
from mtjax.models import fused_add_norm as fused

RATE, EPS = 0.1, 1e-12


def check(shape, dtype) -> dict[str, float]:
    """Max |kernel − reference| of the output and the five gradients (the dense bias's a float32
    sum over all B·L rows: compare it with the sum's size, printed as |ddense_bias|)."""
    ky, kd, kr, kg = jax.random.split(jax.random.key(0), 4)
    y, r = jax.random.normal(ky, shape, dtype), jax.random.normal(kr, shape, dtype)
    dense_bias = 0.5 * jax.random.normal(kd, (shape[-1],))
    scale, bias = 1.0 + 0.1 * jnp.arange(shape[-1]) / shape[-1], jnp.full((shape[-1],), 0.05)
    operands = (y, dense_bias, r, scale, bias)
    seed = jnp.int32(77)
    g = jax.random.normal(kg, shape, dtype)
    out_f, vjp_f = jax.vjp(lambda *a: fused.add_dropout_layer_norm(*a, seed, RATE, EPS), *operands)
    out_r, vjp_r = jax.vjp(lambda *a: fused.add_norm_reference(*a, seed, RATE, EPS), *operands)
    errs = {"out": out_f.astype(jnp.float32) - out_r.astype(jnp.float32)}
    grads_r = vjp_r(g)
    for name, a, b in zip(("dy", "ddense_bias", "dresidual", "dscale", "dbias"), vjp_f(g), grads_r):
        errs[name] = a.astype(jnp.float32) - b.astype(jnp.float32)
    return {**{k: float(jnp.max(jnp.abs(v))) for k, v in errs.items()},
            "|ddense_bias|": float(jnp.max(jnp.abs(grads_r[1])))}


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser("bench_add_norm", __doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=500)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--rows", default="2,4,8", help="rows per block (Launch.rows), comma-separated")
    p.add_argument("--blocks", default="4,8,16", help="blocks per program (Launch.blocks), comma-separated")
    p.add_argument("--warps", default="4,8", help="warps per program (Launch.warps), comma-separated")
    args = p.parse_args(argv)
    if not on_gpu("bench_add_norm"):
        return 2
    shape = (args.batch, args.seq, args.width)
    print(f"device: {jax.devices()[0].device_kind}; activations {shape}; dropout {RATE}")
    for dtype in (jnp.float32, jnp.bfloat16):
        errs = check(shape, dtype)
        print(f"check vs written out ({jnp.dtype(dtype).name}, same mask): "
              + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))

    ky, kr = jax.random.split(jax.random.key(1))
    operands = (jax.random.normal(ky, shape, jnp.bfloat16), jnp.full(args.width, 0.02),
                jax.random.normal(kr, shape, jnp.bfloat16), jnp.ones(args.width), jnp.zeros(args.width))
    seed = jnp.int32(5)
    argnums = tuple(range(len(operands)))
    rows = [("xla written-out", "-", *time_forward_and_grad(lambda *a: fused.add_norm_reference(*a, seed, RATE, EPS), lambda: operands, argnums, args.steps))]
    settings = itertools.product(*(map(int, s.split(",")) for s in (args.rows, args.blocks, args.warps)))
    kernel_times = []
    for setting in (fused.Launch(*s) for s in settings):
        fused.FORWARD = fused.BACKWARD = setting
        fused._fwd_op.cache_clear(), fused._bwd_op.cache_clear()
        fn = lambda *a: fused.add_dropout_layer_norm(*a, seed, RATE, EPS)
        rows.append(kernel_row("fused", str(setting),
                               lambda: time_forward_and_grad(fn, lambda: operands, argnums, args.steps)))
        kernel_times.append((str(setting), profiled_kernel_ms(fn, operands, argnums, args.steps)))
    print_kernel_table("rows per block × blocks per program × warps", rows)
    print("\n| setting | add_norm_fwd µs (GPU) | add_norm_bwd µs (GPU) |\n|---|---|---|")
    for setting, times in kernel_times:
        print(f"| {setting} | " + " | ".join(f"{times.get(k, float('nan')) * 1e3:.1f}"
                                          for k in ("add_norm_fwd", "add_norm_bwd")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

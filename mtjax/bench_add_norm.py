"""BERT's add-norm (dense bias → dropout → + residual → LayerNorm) alone on the GPU: fused kernels vs written out.

    python -m mtjax.bench_add_norm [--batch 32] [--seq 500] [--width 768] [--rows 4,8,16] [--blocks 1,2,4,8]
        [--warps 4,8]

First checks the kernels on this GPU against `add_norm_reference` with the same hash mask
and a nonzero dense bias (float32 operands, then bf16), then times forward and forward +
backward of one add-norm in bf16 with dropout 0.1 (its dense bias and its gradient included),
written out by XLA and fused at each setting of rows per block (`ROWS`), blocks per program
(`BLOCKS_PER_PROGRAM`: each program loops over that many blocks) and warps. The check runs
the module's defaults.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp

from mtjax.bench import kernel_bench_parser, kernel_row, on_gpu, print_kernel_table, time_forward_and_grad
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
    p.add_argument("--rows", default="4,8,16", help="rows per block (ROWS), comma-separated")
    p.add_argument("--blocks", default="1,2,4,8", help="blocks per program (BLOCKS_PER_PROGRAM), comma-separated")
    p.add_argument("--warps", default="4,8", help="warps per program (NUM_WARPS), comma-separated")
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
    for n_rows, blocks, warps in settings:
        fused.ROWS, fused.BLOCKS_PER_PROGRAM, fused.NUM_WARPS = n_rows, blocks, warps
        fused._fwd_op.cache_clear(), fused._bwd_op.cache_clear()
        fn = lambda *a: fused.add_dropout_layer_norm(*a, seed, RATE, EPS)
        rows.append(kernel_row("fused", f"{n_rows}x{blocks}x{warps}",
                               lambda: time_forward_and_grad(fn, lambda: operands, argnums, args.steps)))
    print_kernel_table("rows per block × blocks per program × warps", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

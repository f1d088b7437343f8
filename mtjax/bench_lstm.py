"""HICCAP's video and audio LSTMs alone on the GPU: the persistent kernels vs the scan.

    python -m mtjax.bench_lstm [--batch 32] [--steps 20] [--warps 4,8]

Both BiLSTMs at HICCAP's full size (video 36 × 1024 and audio 63 × 128 features, hidden 512,
two layers, bf16 compute) run together as the model runs them (`lstm.run_together`): with
`impl='scan'` and with `impl='kernel'` (`mtjax.models.lstm_kernel`, 128 programs meeting at
a barrier every step). First checks the kernels against the scan on this GPU (outputs, and
the gradients of every parameter and input, relative to each one's largest value), then
times forward and forward + backward at each setting of warps per program.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.bench import kernel_bench_parser, kernel_row, on_gpu, print_kernel_table, time_forward_and_grad
from mtjax.models import lstm_kernel
from mtjax.models.lstm import BiLSTM, run_together

HIDDEN, LAYERS = 512, 2
SHAPES = {"video": (36, 1024), "audio": (63, 128)}


def _setup(batch: int):
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = [jax.random.normal(k, (batch, *shape), jnp.bfloat16) for k, shape in zip(keys, SHAPES.values())]
    params = [BiLSTM(HIDDEN, LAYERS).init(k, x)["params"] for k, x in zip(keys[2:], inputs)]
    return params, inputs


def _run(impl: str):
    modules = [BiLSTM(HIDDEN, LAYERS, jnp.bfloat16, impl) for _ in SHAPES]

    def fn(params, inputs):
        bound = [m.bind({"params": p}) for m, p in zip(modules, params)]
        return jnp.concatenate(run_together(bound, inputs), axis=1)

    return fn


def _max_abs(a, b=None) -> float:
    """max |a − b| (or |a|) in float32."""
    a = a.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a if b is None else a - b.astype(jnp.float32))))


def check(batch: int) -> dict[str, float]:
    """Max |kernel − scan| of the outputs, and the largest gradient difference relative to
    that gradient's largest value."""
    params, inputs = _setup(batch)
    out_s, vjp_s = jax.vjp(_run("scan"), params, inputs)
    out_k, vjp_k = jax.vjp(_run("kernel"), params, inputs)
    g = jax.random.normal(jax.random.key(9), out_s.shape, out_s.dtype)
    grads_k = vjp_k(g)
    rel = jax.tree.map(lambda a, b: _max_abs(a, b) / _max_abs(b), grads_k, vjp_s(g))
    # Run again: each call starts its barrier counters from zero (a counter left over from the
    # last call would let the programs run ahead of each other: other results).
    again_out, again_vjp = jax.vjp(_run("kernel"), params, inputs)
    again = [_max_abs(a, b) for a, b in zip(jax.tree.leaves((out_k, grads_k)),
                                            jax.tree.leaves((again_out, again_vjp(g))))]
    return {"out": _max_abs(out_k, out_s), "|out|": _max_abs(out_s),
            "grads (relative)": max(jax.tree.leaves(rel)), "second call vs first": max(again)}


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser("bench_lstm", __doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warps", default="4,8", help="warps per program (NUM_WARPS), comma-separated")
    args = p.parse_args(argv)
    if not on_gpu("bench_lstm"):
        return 2
    if not lstm_kernel.supported(args.batch, 2 * len(SHAPES), HIDDEN, jnp.bfloat16):
        print(f"mtjax.bench_lstm: the kernels do not take batch {args.batch} on this GPU "
              f"(at most {lstm_kernel.MAX_BATCH}; {jax.devices()[0].device_kind})", file=sys.stderr)
        return 2
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}; "
          + ", ".join(f"{n} {t}×{d}" for n, (t, d) in SHAPES.items()) + f"; hidden {HIDDEN}, {LAYERS} layers, bf16")
    errs = check(args.batch)
    print("check vs scan: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))

    params, inputs = _setup(args.batch)
    make_args = lambda: (params, inputs)
    rows = [("scan", "-", *time_forward_and_grad(_run("scan"), make_args, (0, 1), args.steps))]
    for warps in map(int, args.warps.split(",")):
        lstm_kernel.NUM_WARPS = warps
        rows.append(kernel_row("kernel", f"{lstm_kernel.UNITS_PER_PROGRAM}x{warps}",
                               lambda: time_forward_and_grad(_run("kernel"), make_args, (0, 1), args.steps)))
    print_kernel_table("units per program × warps", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BERT self-attention alone on the GPU: the fused 'flash' kernels against the written-out path.

    python -m mtjax.bench_attention [--batch 32] [--seq 500] [--blocks 64x64,128x64,...]

Times forward + backward (and forward alone) of one layer's attention at BERT-base shape in
bf16, dropout 0.1 where the path has it, and first checks the kernels on this GPU against
`attention_reference` (same hash mask) at `jax.default_matmul_precision("highest")`. The
'flash' rows are timed in BERT's form, `flash_attention_packed` (a packed projection in, one
packed cotangent out).
Prints a table: path, blocks (forward q×k, backward q×k, warps, stages), ms forward, ms forward+backward.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.bench import kernel_bench_parser, kernel_row, on_gpu, print_kernel_table, time_forward_and_grad
from mtjax.models import flash_attention as flash
from mtjax.models.attention import _softmax_dropout_values

RATE = 0.1


def written_out(q, k, v, key, rate):
    """The 'xla' training path: float32 softmax, nn.Dropout-style threefry mask, ·v."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    return _softmax_dropout_values(scores, v, key if rate > 0 else None, rate)


def cudnn(q, k, v, key, rate):
    assert rate == 0
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def check_kernels(q, k, v, seed, blocks) -> dict[str, float]:
    """Max |kernel − reference| of the output and the three gradients, reference in float32."""
    f = lambda q, k, v: flash.flash_attention(q, k, v, seed, RATE, blocks)
    r = lambda q, k, v: flash.attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), seed, RATE)
    g = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    with jax.default_matmul_precision("highest"):
        out_f, vjp_f = jax.vjp(f, q, k, v)
        out_r, vjp_r = jax.vjp(r, q, k, v)
        grads_f = vjp_f(g.astype(q.dtype))
        grads_r = vjp_r(g)
    errs = {"out": float(jnp.max(jnp.abs(out_f.astype(jnp.float32) - out_r)))}
    for name, a, b in zip("qkv", grads_f, grads_r):
        errs[f"d{name}"] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    errs["ref_scale"] = float(jnp.max(jnp.abs(out_r)))
    return errs


def check_packed_bias_gradient(kvq, seed, blocks) -> dict[str, float]:
    """The packed entry point's gradients against the float32 reference on the unpacked
    operands: the packed cotangent, and the bias gradient the kernels sum per program
    (printed with its size, |dbias|: it sums B·L rows)."""
    bias = 0.1 * jax.random.normal(jax.random.key(11), (3, *kvq.shape[3:]), jnp.float32)
    f = lambda kvq, bias: flash.flash_attention_packed(kvq, bias, seed, RATE, blocks)
    r = lambda kvq, bias: flash.attention_reference(*flash.unpack(kvq.astype(jnp.float32), bias), seed, RATE)
    g = jax.random.normal(jax.random.key(12), (*kvq.shape[:2], *kvq.shape[3:]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        (dkvq_f, dbias_f), (dkvq_r, dbias_r) = (jax.vjp(fn, kvq, bias)[1](g.astype(t))
                                                for fn, t in ((f, kvq.dtype), (r, jnp.float32)))
    return {"dkvq": float(jnp.max(jnp.abs(dkvq_f.astype(jnp.float32) - dkvq_r))),
            "dbias": float(jnp.max(jnp.abs(dbias_f - dbias_r))), "|dbias|": float(jnp.max(jnp.abs(dbias_r)))}


def time_path(fn, operands, steps: int) -> tuple[float, float]:
    """(ms forward, ms forward + backward) of fn(*operands, key) with a fresh dropout key per
    call, the gradient taken with respect to every operand."""
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    return time_forward_and_grad(fn, lambda: (*operands, next(keys)), tuple(range(len(operands))), steps)


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser("bench_attention", __doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=500)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--blocks", default="128x64x64x64x4x3,128x64x64x64x4x2,64x64x64x64x4x3,128x64x64x32x4x3",
                   help="comma-separated 'flash' settings: fwd_q x fwd_k x bwd_q x bwd_k x warps x stages")
    args = p.parse_args(argv)
    if not on_gpu("bench_attention"):
        return 2
    shape = (args.batch, args.seq, args.heads, args.depth)
    q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in jax.random.split(jax.random.key(0), 3))
    seed = flash.seed_from_key(jax.random.key(3))
    settings = [flash.Blocks.parse(b) for b in args.blocks.split(",")]

    print(f"device: {jax.devices()[0].device_kind}; q/k/v {shape} bf16; dropout {RATE}")
    errs = check_kernels(q, k, v, seed, settings[0])
    print("check vs float32 reference (same mask, precision highest): "
          + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))

    slots = {flash.KEY: k, flash.VALUE: v, flash.QUERY: q}
    kvq = jnp.stack([slots[i] for i in range(3)], axis=2)
    errs = check_packed_bias_gradient(kvq, seed, settings[0])
    print("packed check vs float32 reference: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))

    rows = [("xla written-out, dropout", "-", *time_path(functools.partial(written_out, rate=RATE), (q, k, v), args.steps)),
            ("xla written-out, no dropout", "-", *time_path(functools.partial(written_out, rate=0.0), (q, k, v), args.steps)),
            ("cudnn, no dropout", "-", *time_path(functools.partial(cudnn, rate=0.0), (q, k, v), args.steps))]
    packed = (kvq, jnp.zeros((3, args.heads, args.depth), jnp.float32))
    # The first setting also without dropout: what the in-kernel mask costs.
    for rate, s in [(RATE, s) for s in settings] + [(0.0, settings[0])]:
        name = "flash, dropout" if rate else "flash, no dropout"
        fn = lambda kvq, bias, key, s=s, rate=rate: flash.flash_attention_packed(kvq, bias, flash.seed_from_key(key), rate, s)
        rows.append(kernel_row(name, str(s), lambda fn=fn: time_path(fn, packed, args.steps)))
    print_kernel_table("blocks fwd q×k, bwd q×k, warps, stages", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost per train step of every MTL strategy relative to `all_at_once` (unweighted).

    python -m mtjax.bench_strategies [--size small|full] [--batch-size B] [--steps N] [--out FILE.md]

Times the compiled train step of each loss weighting and each gradient aggregator on the
current JAX backend, with the same model, batch and optimizer, and prints a Markdown
table: ms/step (median over N timed steps after warm-up) and the ratio to the
single-loss step. Schedules change which batches and task masks feed the same step, so
their per-step cost is that of the step they drive (`all_at_once`'s unless combined).
`small` is the tiny CPU config; `full` is bert-base sizes (text 500, video 36×1024,
audio 63×128), meant for a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from mtjax.config import ModelConfig, tiny_model_config
from mtjax.models.hiccap import init_variables
from mtjax.mtl.registry import AGGREGATORS, WEIGHTINGS, make_aggregator, make_weighting
from mtjax.train_step import init_train_state, make_optimizer, make_train_step

TASKS = ("mature", "gory", "slapstick", "sarcasm")


def random_batch(config: ModelConfig, batch_size: int, seed: int = 0) -> dict:
    """Fully-populated random inputs (masks all ones, random one-hot labels)."""
    rng = np.random.default_rng(seed)
    c = config
    labels = {t: np.eye(2, dtype=np.float32)[rng.integers(0, 2, batch_size)] for t in c.tasks}
    return {
        "text": rng.integers(1, c.bert.vocab_size, (batch_size, c.text_len)).astype(np.int32),
        "text_mask": np.ones((batch_size, c.text_len), np.float32),
        "video": rng.normal(size=(batch_size, c.video_len, c.video_dim)).astype(np.float32),
        "video_mask": np.ones((batch_size, c.video_len), np.float32),
        "audio": rng.normal(size=(batch_size, c.audio_len, c.audio_dim)).astype(np.float32),
        "audio_mask": np.ones((batch_size, c.audio_len), np.float32),
        "labels": labels,
        "label_mask": {t: np.ones(batch_size, np.float32) for t in c.tasks},
    }


def time_step(config: ModelConfig, weighting_name: str, aggregator_name: str | None, batch,
              steps: int, variables) -> float:
    weighting_opts = {"weights": (0.1, 0.4, 0.2, 0.2)} if weighting_name == "predefined" else {}
    weighting = make_weighting(weighting_name, **weighting_opts)
    aggregator = make_aggregator(aggregator_name, num_tasks=len(config.tasks)) if aggregator_name else None
    optimizer = make_optimizer("adam", lr=1e-5)
    step = jax.jit(make_train_step(config, optimizer, weighting, aggregator), donate_argnums=0)
    # The step donates its state: give it its own copy of the shared initial weights.
    variables = jax.tree_util.tree_map(lambda x: x.copy(), variables)
    state = init_train_state(variables, optimizer, weighting, aggregator, num_tasks=len(config.tasks),
                             rng=jax.random.PRNGKey(0))
    mask = np.ones(len(config.tasks), np.float32)
    batch = jax.device_put(batch)
    for _ in range(2):  # compile + one warm step
        state, metrics = step(state, batch, mask)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, mask)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.bench_strategies", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated subset of strategy names")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)

    if args.size == "small":
        config = tiny_model_config(tasks=TASKS)
        batch_size = args.batch_size or 8
    else:
        config = ModelConfig(tasks=TASKS)
        batch_size = args.batch_size or 16
    batch = random_batch(config, batch_size)
    variables = init_variables(config, jax.random.PRNGKey(0))

    rows = [("all_at_once", "unweighted", None)]
    rows += [(w, w, None) for w in WEIGHTINGS if w != "unweighted"]
    rows += [(a, "unweighted", a) for a in AGGREGATORS]
    if args.only:
        keep = set(args.only.split(",")) | {"all_at_once"}
        rows = [r for r in rows if r[0] in keep]
    results = []
    for name, weighting, aggregator in rows:
        ms = time_step(config, weighting, aggregator, batch, args.steps, variables)
        results.append((name, "weighting" if aggregator is None else "aggregator", ms))
        print(f"  {name}: {ms:.1f} ms/step", file=sys.stderr, flush=True)

    base = results[0][2]
    device = jax.devices()[0]
    lines = [f"Device: {device.platform} ({getattr(device, 'device_kind', '')}); config: {args.size} "
             f"(d={config.hidden_size}, text {config.text_len}); batch {batch_size}; fp32, default matmul "
             f"precision; median of {args.steps} steps",
             "", "| strategy | kind | ms/step | × all_at_once |", "|---|---|---|---|"]
    lines += [f"| {name} | {kind} | {ms:.1f} | {ms / base:.2f} |" for name, kind, ms in results]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

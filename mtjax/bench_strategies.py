"""Cost per train step of every MTL strategy relative to `all_at_once` (unweighted).

    python -m mtjax.bench_strategies [--size small|full] [--dtype float32|bfloat16] [--batch-size B]
                                     [--steps N] [--only a,b] [--features] [--time-budget S] [--out FILE.md]

Times the compiled train step of each loss weighting and each gradient aggregator on the
current JAX backend, with the same model, batch and optimizer, and prints a Markdown
table: ms/step (median over N timed steps after warm-up) and the ratio to the
single-loss step. Schedules change which batches and task masks feed the same step, so
their per-step cost is that of the step they drive (`all_at_once`'s unless combined).
`--features` adds every aggregator on the shared features (`aggregate_on='features'`).

At full size each step is a long XLA compile on the GPU. `--time-budget` bounds the whole
run: whole steps are timed in order until the budget is spent; every aggregator then left
is costed from two measured parts (the row says so): the per-task-gradient step with the
`sum` aggregator, which every aggregator shares, plus the aggregator's own update timed
alone on per-task gradients of the real shapes, minus `sum`'s.
`small` is the tiny CPU config; `full` is bert-base sizes (text 500, video 36×1024,
audio 63×128), meant for a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.bench import median_time
from mtjax.config import ModelConfig, tiny_model_config
from mtjax.models.hiccap import init_variables
from mtjax.mtl.registry import AGGREGATORS, WEIGHTINGS, make_aggregator, make_weighting
from mtjax.train_step import init_train_state, make_optimizer, make_train_step, split_shared

TASKS = ("mature", "gory", "slapstick", "sarcasm")


class Row(NamedTuple):
    name: str
    kind: str          # baseline | weighting | aggregator
    weighting: str
    aggregator: str | None
    aggregate_on: str = "parameters"


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


def _median_ms(fn, steps: int) -> float:
    """Median ms of `fn` (its result waited for) after a compile and a warm call."""
    median_s, _ = median_time(lambda: jax.block_until_ready(fn()), lambda: None, warmup=2, samples=steps)
    return 1000 * median_s


def _weighting(name: str):
    return make_weighting(name, **({"weights": (0.1, 0.4, 0.2, 0.2)} if name == "predefined" else {}))


def time_step(config: ModelConfig, row: Row, batch, steps: int, variables) -> float:
    weighting = _weighting(row.weighting)
    aggregator = make_aggregator(row.aggregator, num_tasks=len(config.tasks)) if row.aggregator else None
    optimizer = make_optimizer("adam", lr=1e-5)
    step = jax.jit(make_train_step(config, optimizer, weighting, aggregator, aggregate_on=row.aggregate_on),
                   donate_argnums=0)
    # The step donates its state: give it its own copy of the shared initial weights.
    variables = jax.tree_util.tree_map(lambda x: x.copy(), variables)
    state = init_train_state(variables, optimizer, weighting, aggregator, num_tasks=len(config.tasks),
                             rng=jax.random.PRNGKey(0))
    mask = jnp.ones(len(config.tasks), jnp.float32)
    batch = jax.device_put(batch)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch, mask)
        return metrics["loss"]

    return _median_ms(one, steps)


def time_aggregator_alone(name: str, per_task, steps: int) -> float:
    """The aggregator's update on its own, on per-task gradients of the real shapes."""
    aggregator = make_aggregator(name, num_tasks=len(TASKS))
    state = aggregator.init(None)
    update = jax.jit(lambda g, s: aggregator.update(g, s))
    return _median_ms(lambda: update(per_task, state)[0], steps)


def per_task_like(tree, num_tasks: int, seed: int = 0):
    """Random (T, ...) float32 leaves shaped like `tree`'s leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, (num_tasks, *np.shape(x)), jnp.float32)
                              for k, x in zip(keys, leaves)])


def plan(features: bool) -> list[Row]:
    rows = [Row("all_at_once", "baseline", "unweighted", None)]
    rows += [Row(w, "weighting", w, None) for w in WEIGHTINGS if w != "unweighted"]
    rows += [Row(a, "aggregator", "unweighted", a) for a in AGGREGATORS]
    if features:
        rows += [Row(f"{a} (features)", "aggregator", "unweighted", a, "features") for a in AGGREGATORS]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.bench_strategies", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated subset of strategy names")
    p.add_argument("--features", action="store_true", help="also every aggregator with aggregate_on=features")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; once spent, the remaining aggregators are costed from measured parts")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    if args.size == "small":
        config = tiny_model_config(tasks=TASKS, dtype=args.dtype)
        batch_size = args.batch_size or 8
    else:
        config = ModelConfig(tasks=TASKS, dtype=args.dtype)
        batch_size = args.batch_size or 16
    batch = random_batch(config, batch_size)
    variables = init_variables(config, jax.random.PRNGKey(0))

    rows = plan(args.features)
    if args.only:
        # The baseline and the parts estimated rows are built from always stay.
        keep = set(args.only.split(",")) | {"all_at_once"}
        if keep & set(AGGREGATORS):
            keep |= {"sum", "sum (features)"}
        rows = [r for r in rows if r.name in keep or r.aggregator in keep]
    # The parts an estimated row needs are measured first, whatever the budget.
    anchors = [r for r in rows if r.name in ("all_at_once", "sum", "sum (features)")]
    rows = anchors + [r for r in rows if r not in anchors]

    measured: dict[str, float] = {}
    how: dict[str, str] = {}
    for row in rows:
        over = args.time_budget is not None and time.perf_counter() - t_start > args.time_budget
        if over and row not in anchors and row.aggregator is not None:
            continue
        if over and row not in anchors:
            print(f"  {row.name}: skipped (time budget spent)", file=sys.stderr, flush=True)
            continue
        measured[row.name] = time_step(config, row, batch, args.steps, variables)
        how[row.name] = "whole step"
        print(f"  {row.name}: {measured[row.name]:.1f} ms/step", file=sys.stderr, flush=True)

    # Aggregators not timed as whole steps: shared per-task step + own update − sum's update.
    left = [r for r in rows if r.aggregator is not None and r.name not in measured]
    if left:
        params = variables["params"]
        shapes = {"parameters": split_shared(params)[0],
                  "features": {"features": jnp.zeros((batch_size, 3 * config.hidden_size), config.dtype)}}
        alone: dict[tuple[str, str], float] = {}
        for row in left:
            base_name = "sum" if row.aggregate_on == "parameters" else "sum (features)"
            if base_name not in measured:
                continue
            for agg in ("sum", row.aggregator):
                if (agg, row.aggregate_on) not in alone:
                    grads = per_task_like(shapes[row.aggregate_on], len(TASKS))
                    alone[(agg, row.aggregate_on)] = time_aggregator_alone(agg, grads, args.steps)
            own = alone[(row.aggregator, row.aggregate_on)] - alone[("sum", row.aggregate_on)]
            measured[row.name] = measured[base_name] + own
            how[row.name] = (f"{base_name} step + update alone ({alone[(row.aggregator, row.aggregate_on)]:.1f} "
                             f"ms) − sum's ({alone[('sum', row.aggregate_on)]:.1f} ms)")
            print(f"  {row.name}: {measured[row.name]:.1f} ms/step (from parts)", file=sys.stderr, flush=True)

    base = measured["all_at_once"]
    device = jax.devices()[0]
    lines = [f"Device: {device.platform} ({getattr(device, 'device_kind', '')}); config: {args.size} "
             f"(d={config.hidden_size}, text {config.text_len}); batch {batch_size}; {args.dtype} compute, "
             f"default matmul precision; median of {args.steps} steps",
             "", "| strategy | kind | ms/step | × all_at_once | measured as |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.kind} | {measured[r.name]:.1f} | {measured[r.name] / base:.2f} | {how[r.name]} |"
              for r in plan(args.features) if r.name in measured]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

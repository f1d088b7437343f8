"""Per-clip probabilities from a model checkpoint.

    python -m mtjax.predict --checkpoint DIR --data-json FILE --i3d-dir DIR --vggish-dir DIR
        --out FILE.jsonl [--batch-size N] [--attention xla|cudnn|flash] [--add-norm xla|fused]

One JSON line per clip (every clip of the JSON, labelled or not), eval mode:
`{"clip": <json key>, "IMDBid": ..., "probs": {"<task>": [p_absent, p_present], ...}}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.checkpoint import CheckpointError, load_model
from mtjax.config import ADD_NORM_IMPLS, ATTENTION_IMPLS, ModelConfig
from mtjax.data import ClipDataset, DataError, check_batch, load_split
from mtjax.data.batching import pad_batch
from mtjax.models.hiccap import MODEL_INPUTS, HICCAP

# Float inputs the model only ever reads cast to its compute dtype (HICCAP.shared_features
# casts them before the BiLSTMs, their only reader): sent already cast, the results are the
# same bits and in bf16 the host→device copy is half the bytes.
FEATURES_CAST_ON_HOST = ("video", "audio")
T = TypeVar("T")


def make_eval_fn(config: ModelConfig):
    """jit-compiled eval-mode forward: (variables, batch) → {task: probs}."""
    model = HICCAP(config)

    @jax.jit
    def eval_fn(variables, batch):
        return model.apply(variables, batch, train=False)

    return eval_fn


def host_inputs(config: ModelConfig, batch: Mapping[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """One dataset batch as the model receives it: checked, padded to `batch_size` (so the
    forward compiles once), the float features already in the compute dtype."""
    check_batch(batch, config)
    inputs = pad_batch({k: batch[k] for k in MODEL_INPUTS}, batch_size)
    compute_dtype = jnp.dtype(config.dtype)
    for k in FEATURES_CAST_ON_HOST:
        inputs[k] = inputs[k].astype(compute_dtype, copy=False)
    return inputs


def host_batches(config: ModelConfig, dataset: ClipDataset,
                 batch_size: int) -> Iterator[tuple[tuple[int, int], dict[str, np.ndarray]]]:
    """((first clip index, real rows), model inputs) for every batch, in dataset order."""
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        yield (start, stop - start), host_inputs(config, dataset.batch(np.arange(start, stop)), batch_size)


def pipelined_predict(eval_fn, variables, tagged_inputs: Iterable[tuple[T, Any]]) -> Iterator[tuple[T, Any]]:
    """(tag, host result of `eval_fn(variables, inputs)`) for each (tag, host inputs), in order.

    Two batches deep: batch i+1 is assembled on the host, sent (`device_put` is asynchronous)
    and dispatched before batch i's result is fetched, so while the device computes one
    batch the host fetches the previous result and builds the next batch; the device
    waits only when that host work takes longer than a step."""
    in_flight = None
    for tag, inputs in tagged_inputs:
        out = eval_fn(variables, jax.device_put(inputs))
        if in_flight is not None:
            yield in_flight[0], jax.device_get(in_flight[1])
        in_flight = tag, out
    if in_flight is not None:
        yield in_flight[0], jax.device_get(in_flight[1])


def predict_dataset(config: ModelConfig, variables, dataset: ClipDataset, batch_size: int,
                    eval_fn=None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (first clip index, {task: probs (n, 2)}) batch by batch, in dataset order.
    Every batch is padded to `batch_size`, so the forward compiles once. `eval_fn` defaults
    to `make_eval_fn(config)` (the benchmark passes its ahead-of-time compiled one)."""
    if eval_fn is None:
        eval_fn = make_eval_fn(config)
    batches = host_batches(config, dataset, batch_size)
    for (start, n), probs in pipelined_predict(eval_fn, variables, batches):
        # jit returns dicts with sorted keys; keep the model's task order for the output.
        yield start, {t: np.asarray(probs[t][:n]) for t in config.tasks}


def write_predictions(config: ModelConfig, variables, dataset: ClipDataset, out: Path,
                      batch_size: int) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    n = 0
    with tmp.open("w") as f:
        for start, probs in predict_dataset(config, variables, dataset, batch_size):
            for i in range(len(next(iter(probs.values())))):
                record: dict[str, Any] = {
                    "clip": dataset.clips[start + i],
                    "IMDBid": dataset.imdb_ids[start + i],
                    "probs": {t: [float(p[i, 0]), float(p[i, 1])] for t, p in probs.items()},
                }
                f.write(json.dumps(record) + "\n")
                n += 1
    tmp.replace(out)  # a crash never leaves a truncated file under the final name
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model directory (convert.weights or mtjax.train)")
    p.add_argument("--data-json", required=True)
    p.add_argument("--i3d-dir", required=True)
    p.add_argument("--vggish-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention", choices=ATTENTION_IMPLS,
                   help="BERT attention kernel (default: the checkpoint's); on GPUs in bf16, cudnn or flash "
                        "run the same function fused")
    p.add_argument("--add-norm", choices=ADD_NORM_IMPLS,
                   help="BERT add-norm (default: the checkpoint's); on GPUs, fused runs the same function as "
                        "one kernel pass")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error("--batch-size must be positive")
    try:
        config, variables, _ = load_model(args.checkpoint)
        config = config.with_attention_impl(args.attention).with_add_norm_impl(args.add_norm)
        dataset = load_split(args.data_json, args.i3d_dir, args.vggish_dir, model_config=config,
                             require_labels=False)
        n = write_predictions(config, variables, dataset, Path(args.out), args.batch_size)
    except (CheckpointError, DataError, OSError) as e:
        print(f"mtjax.predict: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} predictions ({', '.join(config.tasks)}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-clip probabilities from a model checkpoint.

    python -m mtjax.predict --checkpoint DIR --data-json FILE --i3d-dir DIR --vggish-dir DIR
        --out FILE.jsonl [--batch-size N]

One JSON line per clip (every clip of the JSON, labelled or not), eval mode:
`{"clip": <json key>, "IMDBid": ..., "probs": {"<task>": [p_absent, p_present], ...}}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from mtjax.checkpoint import CheckpointError, load_model
from mtjax.config import ModelConfig
from mtjax.data import ClipDataset, DataError, check_batch, load_split
from mtjax.data.batching import pad_batch
from mtjax.models.hiccap import MODEL_INPUTS, HICCAP


def make_eval_fn(config: ModelConfig):
    """jit-compiled eval-mode forward: (variables, batch) → {task: probs}."""
    model = HICCAP(config)

    @jax.jit
    def eval_fn(variables, batch):
        return model.apply(variables, batch, train=False)

    return eval_fn


def predict_dataset(config: ModelConfig, variables, dataset: ClipDataset,
                    batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (first clip index, {task: probs (n, 2)}) batch by batch, in dataset order.
    Every batch is padded to `batch_size`, so the forward compiles once."""
    eval_fn = make_eval_fn(config)
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)))
        batch = dataset.batch(idx)
        check_batch(batch, config)
        inputs = pad_batch({k: batch[k] for k in MODEL_INPUTS}, batch_size)
        probs = jax.device_get(eval_fn(variables, inputs))
        # jit returns dicts with sorted keys; keep the model's task order for the output.
        yield start, {t: np.asarray(probs[t][:len(idx)]) for t in config.tasks}


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
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error("--batch-size must be positive")
    try:
        config, variables, _ = load_model(args.checkpoint)
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

"""Evaluate a model checkpoint on one split of the original layout.

    python -m mtjax.evaluate --checkpoint DIR --split val|test|<name> [--data-root ROOT]
        [--out FILE.json] [--batch-size N]

DIR is a model directory (`python -m convert.weights` output, or one epoch directory of a
training run's `checkpoints/`) or a run directory (its best epoch is evaluated). Inside a
run, the data root and the reader options (positives_only, fine_grained_on_positives,
missing_video) and the batch size default to the run's `experiment.json`; elsewhere
`--data-root` is required. Prints the metrics table and writes
`{"checkpoint", "model_dir", "split", "data_root", "reader", "clips", "metrics"}` to
`--out` (default `DIR/eval_<split>.json`). Bad input: a one-line error, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mtjax.checkpoint import CheckpointError
from mtjax.config import ADD_NORM_IMPLS, ATTENTION_IMPLS, ConfigError
from mtjax.data import DataError

PROG = "python -m mtjax.evaluate"
EXPERIMENT_FILE = "experiment.json"
# Reader options of `load_split` that a run fixes (mtjax.experiment.DataSection); outside a
# run they take the reader's defaults.
READER_DEFAULTS = {"positives_only": False, "fine_grained_on_positives": False, "missing_video": "zeros"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error otherwise)
        print(f"mtjax.evaluate: error: {message}", file=sys.stderr)
        sys.exit(2)


def find_run_dir(checkpoint: Path, model_dir: Path) -> Path | None:
    """The training run a checkpoint belongs to: DIR itself, or `<run>/checkpoints/<epoch>`."""
    candidates = [checkpoint]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent)
    if checkpoint.name == "checkpoints":
        candidates.append(checkpoint.parent)
    for c in candidates:
        if (c / EXPERIMENT_FILE).is_file():
            return c
    return None


def run_data_options(run_dir: Path) -> dict[str, Any]:
    from mtjax.experiment import ExperimentConfig

    path = run_dir / EXPERIMENT_FILE
    try:
        exp = ExperimentConfig.from_json(path.read_text())
    except (ConfigError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a valid experiment record ({' '.join(str(e).split())})") from None
    d = exp.data
    return {"root": d.root, "batch_size": d.eval_batch_size,
            "reader": {"positives_only": d.positives_only,
                       "fine_grained_on_positives": d.fine_grained_on_positives,
                       "missing_video": d.missing_video}}


def evaluate_checkpoint(checkpoint: str | Path, split: str, *, data_root: str | Path | None = None,
                        batch_size: int | None = None, attention_impl: str | None = None,
                        add_norm_impl: str | None = None) -> dict[str, Any]:
    """Metrics of the checkpoint on `split` (the record `main` writes, without printing);
    `attention_impl` and `add_norm_impl` replace the checkpoint's BERT kernels (same function)."""
    import jax

    from mtjax.checkpoint import load_model
    from mtjax.data import load_split, split_paths
    from mtjax.run_checkpoints import resolve_model_dir, uncommitted
    from mtjax.train import evaluate
    from mtjax.train_step import make_eval_step

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"--checkpoint {checkpoint}: not found")
    model_dir = resolve_model_dir(checkpoint)
    run_dir = find_run_dir(checkpoint, model_dir)
    opts = (run_data_options(run_dir) if run_dir is not None
            else {"root": None, "batch_size": 32, "reader": dict(READER_DEFAULTS)})
    root = data_root if data_root is not None else opts["root"]
    if root is None:
        raise ConfigError(f"--checkpoint {checkpoint}: not inside a training run (no {EXPERIMENT_FILE}), "
                          f"so the data is unknown: give --data-root")
    root = Path(root)
    if not root.is_dir():
        where = "--data-root" if data_root is not None else f"data.root of {run_dir / EXPERIMENT_FILE}"
        raise DataError(f"{where}: {root}: directory not found")
    json_path, i3d, vggish = split_paths(root, split)
    if not json_path.is_file():
        raise DataError(f"--split {split!r}: {json_path}: split file not found")
    batch_size = batch_size or opts["batch_size"]

    config, variables, _ = load_model(model_dir)
    config = config.with_attention_impl(attention_impl).with_add_norm_impl(add_norm_impl)
    variables = uncommitted(variables)  # as in training: the same executable (and compile cache entry)
    dataset = load_split(json_path, i3d, vggish, model_config=config, tasks=config.tasks, **opts["reader"])
    if len(dataset) == 0:
        raise DataError(f"{json_path}: no clips to evaluate (after the reader options {opts['reader']})")
    # The training loop's own evaluation (same padding, same metrics), not a copy of it.
    metrics = evaluate(jax.jit(make_eval_step(config)), variables["params"], variables.get("batch_stats", {}),
                       dataset, batch_size)
    return {"checkpoint": str(checkpoint), "model_dir": str(model_dir), "split": split,
            "data_root": str(root), "reader": opts["reader"], "clips": len(dataset), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model directory, a run's epoch directory, or a run directory (best epoch)")
    p.add_argument("--split", required=True, help="split name: val, test, or any <name> with "
                                                  "processed_data/<name>_features_lrec_camera.json")
    p.add_argument("--data-root", help="data root (original layout); default: the run's data.root")
    p.add_argument("--out", help="metrics JSON (default: DIR/eval_<split>.json)")
    p.add_argument("--batch-size", type=int, help="default: the run's data.eval_batch_size, else 32")
    p.add_argument("--attention", choices=ATTENTION_IMPLS,
                   help="BERT attention kernel (default: the checkpoint's); on GPUs in bf16, cudnn or flash "
                        "run the same function fused")
    p.add_argument("--add-norm", choices=ADD_NORM_IMPLS,
                   help="BERT add-norm (default: the checkpoint's); on GPUs, fused runs the same function as "
                        "one kernel pass")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    try:
        record = evaluate_checkpoint(args.checkpoint, args.split, data_root=args.data_root,
                                     batch_size=args.batch_size, attention_impl=args.attention,
                                     add_norm_impl=args.add_norm)
        out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{args.split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out)  # never a truncated file under the final name
    except (ConfigError, DataError, CheckpointError, OSError, ValueError) as e:
        print(f"mtjax.evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from mtjax.metrics import format_metrics_table

    print(format_metrics_table(record["metrics"], title=f"{args.split} ({record['clips']} clips): "
                                                        f"{record['model_dir']}"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

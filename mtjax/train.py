"""Train HICCAP from an experiment config.

    python -m mtjax.train --config configs/demo.yaml [section.key=value ...] [--resume RUN_DIR]

Per epoch: compiled train steps over the shuffled train split, evaluation on the
validation split, the plateau schedule on the selection metric, an orbax checkpoint
(last N + best kept). At the end the best epoch is evaluated on the test split.
Written to the run directory: `metrics.jsonl`, `checkpoints/`, `test_metrics.json`,
plots, and `nonfinite_report.json` if the run stops on non-finite steps.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax.checkpoint import CheckpointError, load_model
from mtjax.config import ConfigError, ModelConfig
from mtjax.data import ClipDataset, DataError, load_split, split_paths
from mtjax.data.batching import pad_batch
from mtjax.experiment import ExperimentConfig, check_paths, load_experiment, load_run_experiment, resolve_model_config
from mtjax.losses import weights_vector
from mtjax.metrics import compute_metrics
from mtjax.models.hiccap import MODEL_INPUTS, init_variables
from mtjax.mtl.registry import make_aggregator, make_weighting
from mtjax.run_checkpoints import RunCheckpointer, uncommitted
from mtjax.schedules import make_schedule, split_strategy_options
from mtjax.train_step import (TrainState, init_train_state, learning_rate, make_eval_step,
                              make_optimizer, make_train_step, set_learning_rate)


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps; the report says where."""


# ----------------------------------------------------------------------------- building

def build_weighting(exp: ExperimentConfig, tasks):
    opts = dict(exp.loss.weighting_options)
    if exp.loss.weighting == "predefined":
        opts["weights"] = tuple(float(x) for x in weights_vector(exp.loss.weights or {}, tasks))
    return make_weighting(exp.loss.weighting, **opts)


def build_optimizer(exp: ExperimentConfig) -> optax.GradientTransformation:
    o = exp.optim
    return make_optimizer(o.name, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                          clip_norm=o.clip_norm, mu_dtype=o.mu_dtype)


def build_plateau(exp: ExperimentConfig):
    o = exp.optim
    # PyTorch ReduceLROnPlateau(mode='max'): optax minimises, so it is fed −metric.
    return optax.contrib.reduce_on_plateau(factor=o.plateau_factor, patience=o.plateau_patience,
                                           rtol=o.plateau_rtol, min_scale=o.plateau_min_lr / o.lr)


def load_splits(exp: ExperimentConfig, config: ModelConfig) -> dict[str, ClipDataset]:
    d = exp.data
    out = {}
    for name in (d.train_split, d.val_split, d.test_split):
        json_path, i3d, vggish = split_paths(d.root, name)
        out[name] = load_split(json_path, i3d, vggish, model_config=config, tasks=config.tasks,
                               positives_only=d.positives_only,
                               fine_grained_on_positives=d.fine_grained_on_positives,
                               missing_video=d.missing_video)
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate(eval_fn, params, batch_stats, dataset: ClipDataset, batch_size: int) -> dict[str, Any]:
    probs = {t: [] for t in dataset.tasks}
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)))
        batch = pad_batch({k: v for k, v in dataset.batch(idx).items() if k in MODEL_INPUTS}, batch_size)
        out = jax.device_get(eval_fn(params, batch_stats, batch))
        for t in probs:
            probs[t].append(np.asarray(out[t][:len(idx)]))
    probs = {t: np.concatenate(v) for t, v in probs.items()}
    labels = dataset.arrays["labels"]
    bad = {t: ~np.isfinite(p).all(axis=1) for t, p in probs.items()}
    if any(b.any() for b in bad.values()):
        # compute_metrics refuses NaN. A diverged model (finite weights, non-finite outputs)
        # must score low rather than crash the run: its non-finite outputs count as wrong.
        for t, b in bad.items():
            probs[t][b] = 1.0 - np.asarray(labels[t])[b]
        clips = [dataset.clips[i] for i in np.flatnonzero(np.any(list(bad.values()), axis=0))]
        print(f"warning: non-finite outputs on {len(clips)} of {len(dataset)} clips "
              f"(tasks {[t for t, b in bad.items() if b.any()]}), counted as wrong; first: {clips[:5]}",
              file=sys.stderr)
    return compute_metrics(probs, labels, dataset.arrays["label_mask"])


# ----------------------------------------------------------------------------- the loop

def _scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Flattens a log record's numbers into (tag, value) pairs: `val/per_task/gory/f1`."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


class MetricsLog:
    """`metrics.jsonl`, mirrored to TensorBoard event files when a writer is installed
    (`torch.utils.tensorboard` needs the `tensorboard` package; without it, JSONL only)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.file = path.open("a")
        self.tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None and record.get("kind") in ("step", "epoch"):
            kind = record["kind"]
            x = record["step"] if kind == "step" else record["epoch"]
            for tag, value in _scalars({k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}):
                self.tensorboard.add_scalar(f"{kind}/{tag}", value, x)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _host_float(x) -> float:
    return float(np.asarray(x))


class Trainer:
    def __init__(self, exp: ExperimentConfig, *, resume: bool = False):
        self.exp = exp
        self.run_dir = Path(exp.output_dir)
        self.config = resolve_model_config(exp)
        check_paths(exp)
        self.tasks = self.config.tasks
        self.datasets = load_splits(exp, self.config)
        self.train_set = self.datasets[exp.data.train_split]
        if len(self.train_set) < 2:
            raise DataError(f"{exp.data.root}: the train split has {len(self.train_set)} clips; "
                            f"training BatchNorm needs at least 2")
        if exp.model.init_checkpoint:
            _, variables, _ = load_model(exp.model.init_checkpoint)
            variables = _with_config_heads(variables, self.config, exp.seed)
        else:
            variables = init_variables(self.config, jax.random.PRNGKey(exp.seed))
        self.weighting = build_weighting(exp, self.tasks)
        # strategy.options holds both the schedule's and the aggregator's options.
        schedule_opts, aggregator_opts = split_strategy_options(
            exp.strategy.schedule, exp.strategy.options, has_aggregator=bool(exp.strategy.aggregator))
        try:
            self.aggregator = (make_aggregator(exp.strategy.aggregator, num_tasks=len(self.tasks),
                                               **aggregator_opts)
                               if exp.strategy.aggregator else None)
        except TypeError as e:
            raise ConfigError(f"strategy.options: {e}") from None
        self.optimizer = build_optimizer(exp)
        self.schedule = make_schedule(exp.strategy.schedule, self.train_set, self.tasks,
                                      batch_size=exp.data.batch_size, seed=exp.seed, model_config=self.config,
                                      max_steps_per_epoch=exp.train.max_steps_per_epoch,
                                      epochs=exp.train.epochs, **schedule_opts)
        step = make_train_step(self.config, self.optimizer, self.weighting, self.aggregator,
                               aggregate_on=exp.strategy.aggregate_on, l2=exp.loss.l2, l2_coef=exp.loss.l2_coef,
                               pack_small_arrays=exp.optim.pack_small_arrays)
        self.train_step = jax.jit(step, donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(self.config))
        self.plateau = build_plateau(exp) if exp.optim.schedule == "plateau" else None
        state = init_train_state(variables, self.optimizer, self.weighting, self.aggregator,
                                 num_tasks=len(self.tasks), rng=jax.random.PRNGKey(exp.seed + 1),
                                 pack_small_arrays=exp.optim.pack_small_arrays)
        self.state = {"train": state, "plateau": self.plateau.init({}) if self.plateau else {}}
        self.epoch = 0
        self.best = {"epoch": None, "value": -np.inf}
        self.consecutive_skips = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = RunCheckpointer(self.run_dir / "checkpoints", keep=exp.train.keep_checkpoints,
                                           async_save=exp.train.async_checkpoints)
        if resume:
            self._resume()
        (self.run_dir / "experiment.json").write_text(exp.to_json())

    # -- resume -------------------------------------------------------------------------

    def _resume(self) -> None:
        latest = self.checkpoints.latest_epoch()
        if latest is None:
            raise CheckpointError(f"{self.checkpoints.directory}: no complete checkpoint to resume from")
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                          self.state)
        self.state, run = self.checkpoints.restore(latest, abstract)
        self.state["train"] = TrainState(*self.state["train"]) if not isinstance(
            self.state["train"], TrainState) else self.state["train"]
        self.epoch = int(run["epoch"]) + 1
        self.best = run["best"]
        self.consecutive_skips = int(run["consecutive_skips"])
        self.schedule.load_state_dict(run.get("schedule", {}))
        # Keep metrics.jsonl consistent with the restored epoch: drop what came after it.
        log = self.run_dir / "metrics.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines()
                    if line and json.loads(line).get("epoch", 0) <= int(run["epoch"])]
            log.write_text("".join(line + "\n" for line in kept))
        print(f"resumed {self.run_dir} after epoch {run['epoch']} (step {run['step']})")

    # -- one epoch ----------------------------------------------------------------------

    def _handle_step(self, log: MetricsLog, epoch: int, step: int, metrics, clips: list[str], mask) -> float:
        """The host's part of train step number `step`: fetch its metrics, count non-finite
        skips (stop after too many), log, feed the schedule. Returns the step's loss."""
        m = jax.device_get(metrics)
        if int(m["finite"]) == 0:
            self.consecutive_skips += 1
            bad = [t for t, v in zip(self.tasks, np.asarray(m["task_losses"])) if not np.isfinite(v)]
            log.write({"kind": "skip", "step": step, "epoch": epoch, "nonfinite_tasks": bad, "clips": clips})
            if self.consecutive_skips >= self.exp.train.max_consecutive_skips:
                report = {"step": step, "epoch": epoch, "consecutive_skips": self.consecutive_skips,
                          "nonfinite_tasks": bad, "clips": clips,
                          "task_losses": {t: _host_float(v) for t, v in zip(self.tasks, m["task_losses"])},
                          "loss": _host_float(m["loss"])}
                (self.run_dir / "nonfinite_report.json").write_text(json.dumps(report, indent=2))
                raise TrainingStopped(
                    f"stopped after {self.consecutive_skips} consecutive non-finite steps at step {step} "
                    f"(epoch {epoch}); non-finite task losses: {bad or 'none (gradients only)'}; "
                    f"clips in the batch: {clips}; report: {self.run_dir / 'nonfinite_report.json'}")
        else:
            self.consecutive_skips = 0
        if step % self.exp.train.log_every == 0 or int(m["finite"]) == 0:
            record = {"kind": "step", "step": step, "epoch": epoch, "loss": _host_float(m["loss"]),
                      "task_losses": {t: _host_float(v) for t, v in zip(self.tasks, m["task_losses"])},
                      "loss_weights": {t: _host_float(v) for t, v in zip(self.tasks, m["loss_weights"])},
                      "lr": _host_float(m["learning_rate"]), "grad_norm": _host_float(m["grad_norm"]),
                      "finite": int(m["finite"])}
            sample_weights = self.schedule.sample_weights()  # the weights this step's batch was drawn with
            if sample_weights is not None:
                record["sample_weights"] = sample_weights
            log.write(record)
        self.schedule.observe(mask, np.asarray(m["task_losses"]))
        return float(m["loss"])

    def train_epoch(self, epoch: int, log: MetricsLog) -> dict[str, float]:
        from tqdm import tqdm

        bar = tqdm(self.schedule.steps(epoch), desc=f"epoch {epoch}",
                   # A bar only on a terminal: in logs and CI it would print a line per update.
                   disable=not (self.exp.train.progress_bar and sys.stderr.isatty()), leave=False)
        seen, losses, t0 = 0, [], time.perf_counter()
        # Step i's host work (fetching its metrics waits for it) runs after step i+1 is
        # dispatched, so the device never idles while the host logs or dispatches. A schedule
        # that draws the next batch from the last step's losses gets them first: one at a time.
        in_flight = 0 if self.schedule.draws_from_step_losses else 1
        pending: collections.deque = collections.deque()

        def handle_pending(keep: int) -> None:
            while len(pending) > keep:
                losses.append(self._handle_step(log, epoch, *pending.popleft()))

        step = int(np.asarray(self.state["train"].step))
        try:
            for clips, batch, mask in bar:
                self.state["train"], metrics = self.train_step(self.state["train"], batch, mask)
                step += 1
                pending.append((step, metrics, clips, mask))
                handle_pending(in_flight)
                seen += len(clips)
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", clips_per_s=f"{seen / (time.perf_counter() - t0):.1f}")
        except TrainingStopped:
            raise
        except BaseException:
            handle_pending(0)  # a crash in the loop still logs the steps that were taken
            raise
        handle_pending(0)
        finite = [x for x in losses if np.isfinite(x)]
        return {"loss": float(np.mean(finite)) if finite else float("nan"),
                "clips_per_s": seen / max(time.perf_counter() - t0, 1e-9)}

    def run(self) -> dict[str, Any]:
        exp = self.exp
        log = MetricsLog(self.run_dir / "metrics.jsonl", self.run_dir / "tensorboard")
        val_set = self.datasets[exp.data.val_split]
        try:
            for epoch in range(self.epoch, exp.train.epochs):
                train_stats = self.train_epoch(epoch, log)
                ts = self.state["train"]
                self.state["train"] = ts._replace(weighting_state=self.weighting.end_epoch(ts.weighting_state))
                val = evaluate(self.eval_step, ts.params, ts.batch_stats, val_set, exp.data.eval_batch_size)
                value = float(val[exp.train.select_metric])
                self.schedule.end_epoch(epoch, val)
                if self.plateau is not None:
                    _, self.state["plateau"] = self.plateau.update({}, self.state["plateau"], value=-value)
                    lr = exp.optim.lr * float(self.state["plateau"].scale)
                    ts = self.state["train"]
                    self.state["train"] = ts._replace(opt_state=set_learning_rate(ts.opt_state, lr))
                if value > self.best["value"]:
                    self.best = {"epoch": epoch, "value": value}
                step = int(np.asarray(self.state["train"].step))
                log.write({"kind": "epoch", "epoch": epoch, "step": step, "train": train_stats, "val": val,
                           "lr": float(learning_rate(self.state["train"].opt_state))})
                print(f"epoch {epoch}: train loss {train_stats['loss']:.4f}  "
                      f"val {exp.train.select_metric} {value:.4f}  ({train_stats['clips_per_s']:.1f} clips/s)")
                ts = self.state["train"]
                self.checkpoints.save(
                    epoch, self.state, {"params": ts.params, "batch_stats": ts.batch_stats}, self.config,
                    {"epoch": epoch, "step": step, "best": self.best,
                     "consecutive_skips": self.consecutive_skips, "schedule": self.schedule.state_dict(),
                     "experiment": exp.to_dict()},
                    select_value=value)
            self.checkpoints.wait()
            return self.finish()
        finally:
            log.close()
            self.checkpoints.close()

    def finish(self) -> dict[str, Any]:
        best_epoch = self.checkpoints.best_epoch()
        if best_epoch is None:
            raise CheckpointError("no checkpoint was written: nothing to test")
        # uncommitted like the training state, so the eval step compiled for validation is reused
        variables = uncommitted(load_model(self.checkpoints.step_dir(best_epoch))[1])
        test_set = self.datasets[self.exp.data.test_split]
        test = evaluate(self.eval_step, variables["params"], variables["batch_stats"], test_set,
                        self.exp.data.eval_batch_size)
        result = {"best_epoch": best_epoch, "best_model": str(self.checkpoints.step_dir(best_epoch)),
                  "test": test}
        (self.run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2))
        try:
            from mtjax.plot import plot_run

            result["plots"] = [str(p) for p in plot_run(self.run_dir)]
        except Exception as e:  # plots are a convenience; never lose a finished run over them
            print(f"warning: plots not written: {e}", file=sys.stderr)
        return result


def _with_config_heads(variables, config: ModelConfig, seed: int):
    """Drops checkpoint heads the run does not train (a task subset was asked for)."""
    params = {k: v for k, v in variables["params"].items()
              if not k.startswith("heads_") or k[len("heads_"):] in config.tasks}
    stats = {k: v for k, v in variables.get("batch_stats", {}).items()
             if not k.startswith("heads_") or k[len("heads_"):] in config.tasks}
    return {"params": params, "batch_stats": stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtjax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = p.parse_args(argv)
    try:
        if args.resume:
            exp = load_run_experiment(args.resume, args.overrides)
        elif args.config:
            exp = load_experiment(args.config, args.overrides)
        else:
            p.error("give --config or --resume")
        result = Trainer(exp, resume=bool(args.resume)).run()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"mtjax.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"mtjax.train: {e}", file=sys.stderr)
        return 3
    from mtjax.metrics import format_metrics_table

    print(format_metrics_table(result["test"], title=f"test (best epoch {result['best_epoch']})"))
    print(f"run directory: {exp.output_dir}")
    for path in result.get("plots", []):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

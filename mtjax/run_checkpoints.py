"""Training-run checkpoints: orbax CheckpointManager, one step directory per epoch.

Each step directory holds the items
- `state`: the whole resumable state (TrainState, plateau state) — StandardSave;
- `variables`, `model_config`, `metadata`: the model-directory layout of
  `mtjax.checkpoint`, so any epoch's directory is also a model `predict` can load;
- `run`: JSON with epoch, step, the best metric so far, the skip counter, history and
  the experiment config (data order is a function of (seed, epoch), so it needs no more).

Kept: the last N epochs and the best by the selection metric (orbax preservation
policies). Orbax writes into a temporary directory and renames it when complete, so
a crash mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mtjax.checkpoint import METADATA, MODEL_CONFIG, VARIABLES, CheckpointError
from mtjax.config import ModelConfig

STATE = "state"
RUN = "run"


def _rank(metrics) -> tuple[float, int]:
    # Higher selection metric is better; on a tie the earlier epoch wins (as Trainer.best).
    return float(metrics["select"]), -int(metrics.get("epoch", 0))


def uncommitted(tree):
    """The same values as fresh (uncommitted) device arrays.

    Orbax restores arrays committed to a device, while a freshly initialised state is
    uncommitted; jit lowers the two differently (explicit shardings), so a resumed run
    would compile its train step again, and once more per epoch for the mix of both
    after the plateau schedule sets an (uncommitted) learning rate."""
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.asarray, jax.device_get(tree))


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


class RunCheckpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=_rank, reverse=False, n=1),
        ])
        self.manager = ocp.CheckpointManager(
            self.directory,
            # best_fn is what makes orbax record the metrics with each step at all; without
            # it best_step() silently returns the latest step and BestN never sees a metric.
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_rank, best_mode="max",
                                                 enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True),
        )

    def save(self, epoch: int, state: Mapping[str, Any], variables: Mapping[str, Any],
             config: ModelConfig, run: Mapping[str, Any], select_value: float) -> None:
        if not _all_finite(state):
            # Never let a non-finite value into a checkpoint: it would poison every resume.
            raise CheckpointError(f"refusing to save epoch {epoch}: the train state holds non-finite values")
        self.manager.save(epoch, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            VARIABLES: ocp.args.StandardSave(dict(variables)),
            MODEL_CONFIG: ocp.args.JsonSave(config.to_dict()),
            METADATA: ocp.args.JsonSave({"epoch": epoch, "kind": "training checkpoint"}),
            RUN: ocp.args.JsonSave(dict(run)),
        }), metrics={"select": float(select_value), "epoch": int(epoch)})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def best_epoch(self) -> int | None:
        return self.manager.best_step()

    def step_dir(self, epoch: int) -> Path:
        return self.directory / str(epoch)

    def restore(self, epoch: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        restored = self.manager.restore(epoch, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            RUN: ocp.args.JsonRestore(),
        }))
        return uncommitted(restored[STATE]), dict(restored[RUN])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory / its `checkpoints/` → the best epoch's directory."""
    from mtjax.checkpoint import is_model_dir

    path = Path(path)
    if is_model_dir(path):
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if ckpts.is_dir():
        manager = ocp.CheckpointManager(ckpts.absolute(), options=ocp.CheckpointManagerOptions(
            read_only=True, best_fn=_rank, best_mode="max"))
        epoch = manager.best_step() if manager.best_step() is not None else manager.latest_step()
        if epoch is not None:
            return ckpts / str(epoch)
    raise CheckpointError(f"{path}: neither a model directory nor a training run with checkpoints")

"""Model checkpoints with orbax: variables (params + batch_stats) beside the model config.

A model directory holds the orbax items `variables`, `model_config` (JSON) and
`metadata` (JSON), so it restores with no flags. Orbax writes into a temporary
directory and renames it when complete: an interrupted save never leaves a directory
that looks finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from mtjax.config import ModelConfig

VARIABLES = "variables"
MODEL_CONFIG = "model_config"
METADATA = "metadata"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or not ours."""


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(directory: str | Path, variables: Mapping[str, Any], config: ModelConfig, *,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists (pass overwrite to replace it)")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    _checkpointer().save(
        directory,
        ocp.args.Composite(**{
            VARIABLES: ocp.args.StandardSave(variables),
            MODEL_CONFIG: ocp.args.JsonSave(config.to_dict()),
            METADATA: ocp.args.JsonSave(dict(metadata or {})),
        }),
        force=overwrite,
    )
    return directory


def is_model_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / VARIABLES).is_dir() and (d / MODEL_CONFIG).is_dir()


def load_model_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if not is_model_dir(directory):
        raise CheckpointError(
            f"{directory}: not a model checkpoint (expected orbax items '{VARIABLES}' and "
            f"'{MODEL_CONFIG}'; write one with `python -m convert.weights` or `python -m mtjax.train`)")
    restored = _checkpointer().restore(directory, ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
    return ModelConfig.from_dict(restored[MODEL_CONFIG])


def load_model(directory: str | Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """→ (config, variables, metadata), variables restored onto the model's own shapes."""
    from mtjax.models.hiccap import init_variables  # the model imports are heavy; keep them lazy

    config = load_model_config(directory)
    directory = Path(directory).absolute()
    abstract = jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0)))
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    restored = _checkpointer().restore(directory, ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardRestore(abstract),
        METADATA: ocp.args.JsonRestore(),
    }))
    return config, dict(restored[VARIABLES]), dict(restored[METADATA] or {})

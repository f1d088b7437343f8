"""The original's loss: `F.binary_cross_entropy` on softmax outputs, per task.

PyTorch's BCE clamps each log at −100 (so p = 0 gives a finite loss); reproduced here with
a gradient that stays finite at p = 0 too.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

LOG_CLAMP = -100.0
# The original multi-task recipe's fixed weights (SPEC §2.8).
ORIGINAL_MULTITASK_WEIGHTS = {"mature": 0.1, "gory": 0.4, "slapstick": 0.2, "sarcasm": 0.2}


def clamped_log(p: jax.Array) -> jax.Array:
    """max(log p, −100) whose gradient is 0 (not NaN) where p = 0. NaN stays NaN (as in
    PyTorch): a NaN output must make its task loss non-finite, not a clamped 100."""
    positive = p > 0
    out = jnp.where(positive, jnp.maximum(jnp.log(jnp.where(positive, p, 1.0)), LOG_CLAMP), LOG_CLAMP)
    return jnp.where(jnp.isnan(p), p, out)


def bce_per_example(probs: jax.Array, onehot: jax.Array) -> jax.Array:
    """(B, 2) probabilities and one-hot targets → (B,) mean BCE over the two outputs."""
    probs = probs.astype(jnp.float32)
    onehot = onehot.astype(jnp.float32)
    elementwise = -(onehot * clamped_log(probs) + (1.0 - onehot) * clamped_log(1.0 - probs))
    return jnp.mean(elementwise, axis=-1)


def masked_bce(probs: jax.Array, onehot: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean BCE over the clips where `mask` is 1 (all clips when None): with a full mask
    this is exactly `F.binary_cross_entropy(probs, onehot)`. An empty mask gives 0."""
    per_example = bce_per_example(probs, onehot)
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def task_losses(probs: Mapping[str, jax.Array], labels: Mapping[str, jax.Array],
                label_mask: Mapping[str, jax.Array] | None, tasks: Sequence[str]) -> jax.Array:
    """(T,) losses in `tasks` order."""
    return jnp.stack([
        masked_bce(probs[t], labels[t], None if label_mask is None else label_mask[t]) for t in tasks
    ])


def weights_vector(weights: Mapping[str, float], tasks: Sequence[str]) -> jax.Array:
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise ValueError(f"loss weights given for {sorted(weights)} but not for tasks {missing}")
    return jnp.asarray([weights[t] for t in tasks], jnp.float32)


def l2_norm_sum(params) -> jax.Array:
    """Σ_w ‖w‖₂ over every parameter array — the binary recipe's regulariser (SPEC §2.8)."""
    return sum(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in jax.tree_util.tree_leaves(params))

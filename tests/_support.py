"""Shared test fixtures-as-functions: random batches and reference → Flax conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtjax.config import ModelConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"


def random_batch(config: ModelConfig, batch_size: int = 4, seed: int = 0, *, with_labels: bool = True):
    """A realistic numpy batch: left-padded text of varied lengths, right-padded features."""
    rng = np.random.default_rng(seed)
    c = config
    b = batch_size
    text = np.zeros((b, c.text_len), np.int32)
    text_mask = np.zeros((b, c.text_len), np.float32)
    video = np.zeros((b, c.video_len, c.video_dim), np.float32)
    video_mask = np.zeros((b, c.video_len), np.float32)
    audio = np.zeros((b, c.audio_len, c.audio_dim), np.float32)
    audio_mask = np.zeros((b, c.audio_len), np.float32)
    for i in range(b):
        n = int(rng.integers(2, c.text_len + 1))
        text[i, c.text_len - n:] = rng.integers(1, c.bert.vocab_size, n)
        text[i, c.text_len - n] = min(101, c.bert.vocab_size - 1)
        text_mask[i, c.text_len - n:] = 1
        sv = int(rng.integers(1, c.video_len + 1))
        video[i, :sv] = rng.normal(size=(sv, c.video_dim))
        video_mask[i, :sv] = 1
        sa = int(rng.integers(1, c.audio_len + 1))
        audio[i, :sa] = rng.normal(size=(sa, c.audio_dim))
        audio_mask[i, :sa] = 1
    batch = dict(text=text, text_mask=text_mask, video=video, video_mask=video_mask,
                 audio=audio, audio_mask=audio_mask)
    if with_labels:
        cls = rng.integers(0, 2, size=(len(c.tasks), b))
        batch["labels"] = {t: np.eye(2, dtype=np.float32)[cls[k]] for k, t in enumerate(c.tasks)}
        batch["label_mask"] = {t: np.ones(b, np.float32) for t in c.tasks}
    return batch


def torch_inputs(batch):
    import torch

    return [torch.from_numpy(np.asarray(batch[k])) for k in
            ("text", "text_mask", "video", "video_mask", "audio", "audio_mask")]


def flax_variables_from_reference(reference, config: ModelConfig | None = None):
    """Reference weights → Flax variables through the converter's own tables."""
    from convert.reference import unified_state_dict
    from convert.weights import convert_source, state_source

    config = config or reference.config
    base = config.replace(tasks=config.tasks)
    fmt_variant = config.variant
    new_config, variables, _ = convert_source(
        state_source(unified_state_dict(reference)), fmt="unified", variant=fmt_variant,
        tasks=list(config.tasks), base=base, bert_config=config.bert.to_hf_dict())
    # `unified` implies one projection per forward; restore what the reference uses.
    return new_config.replace(project_per_branch=config.project_per_branch, pooling=config.pooling), variables


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# A very small experiment for trainer-level tests; format with `out`, `data` and `epochs`.
TINY_EXPERIMENT = """name: tiny
output_dir: {out}
model:
  overrides:
    bert: {{vocab_size: 30522, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, max_position_embeddings: 32}}
    text_len: 24
    video_len: 4
    audio_len: 4
    video_dim: 8
    audio_dim: 6
    lstm_hidden: 4
    lstm_layers: 1
    fusion_heads: 2
    head_dims: [8, 4, 4]
    tasks: [binary, mature, gory]
data: {{root: {data}, fine_grained_on_positives: true, batch_size: 6, eval_batch_size: 16}}
optim: {{name: adamw, lr: 3e-3}}
train: {{epochs: {epochs}, log_every: 1, progress_bar: false, async_checkpoints: false, keep_checkpoints: 1}}
"""


def max_tree_diff(a, b) -> float:
    """Largest |a − b| over the leaves of two pytrees of arrays."""
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare_sharded(fn, args, sharded_args) -> dict:
    """`fn` jitted on one device's `args` vs on `sharded_args` (for the sharding tests' 4-CPU
    subprocesses): the largest difference, the all-gathers in the compiled sharded program, and
    for each output leaf whether it stays split over all the devices."""
    import jax

    single = jax.jit(fn)(*args)
    jitted = jax.jit(fn)
    got = jitted(*sharded_args)
    hlo = jitted.lower(*sharded_args).compile().as_text()
    return {"diff": max_tree_diff(single, got), "all_gathers": hlo.count("all-gather"),
            "split": [len(x.sharding.device_set) == jax.device_count() and not x.sharding.is_fully_replicated
                      for x in jax.tree.leaves(got)]}


def jaxpr_equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scans, conds, custom rules) included."""
    from jax.extend.core import jaxprs_in_params

    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from jaxpr_equations(sub)

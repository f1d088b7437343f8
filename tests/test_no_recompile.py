"""Static shapes: the jitted train and eval steps compile once and never again.

Two epochs of the real batch pipeline (`mtjax.schedules`: shuffled batches padded to the
batch size, a short last batch, per-task masks from round robin), a learning-rate change
between them as the plateau schedule makes, and an evaluation pass with a short last
batch. Compilations are counted two ways: the jitted function's cache size, and JAX's
backend-compile events (which would also catch any eager op compiled inside the loop).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtjax.config import ModelConfig
from mtjax.data import ClipDataset
from mtjax.data.batching import pad_batch
from mtjax.models.hiccap import MODEL_INPUTS, init_variables
from mtjax.mtl.weightings import predefined
from mtjax.schedules import make_schedule
from mtjax.train_step import (init_train_state, make_eval_step, make_optimizer, make_train_step,
                              set_learning_rate)
from tests._support import random_batch

CFG = ModelConfig(bert=dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16),
                  text_len=12, video_len=4, audio_len=5, video_dim=8, audio_dim=6, lstm_hidden=8,
                  lstm_layers=1, fusion_heads=2, head_dims=(12, 8, 4))
N_CLIPS, BATCH = 11, 4   # batches of 4, 4 and a short last one of 3


class CompileCounter:
    """Counts XLA backend compilations while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if self.active and event == self.EVENT:
            self.count += 1


COUNTER = CompileCounter()


def make_dataset() -> ClipDataset:
    arrays = random_batch(CFG, N_CLIPS, seed=0)
    flags = np.zeros(N_CLIPS, bool)
    return ClipDataset(clips=[f"clip{i}" for i in range(N_CLIPS)], imdb_ids=[f"tt{i}" for i in range(N_CLIPS)],
                       ids=np.arange(N_CLIPS), arrays=arrays, tasks=CFG.tasks, video_missing=flags,
                       audio_missing=flags.copy(), rgb_flow_mismatch=flags.copy(), empty_features=flags.copy())


@pytest.mark.parametrize("schedule", ["all_at_once", "round_robin"])
def test_train_and_eval_steps_compile_once(schedule):
    dataset = make_dataset()
    opt = make_optimizer("adam", lr=1e-3)
    weighting = predefined((0.1, 0.4, 0.2, 0.2))
    state = init_train_state(init_variables(CFG, jax.random.PRNGKey(0)), opt, weighting, None, num_tasks=4,
                             rng=jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(CFG, opt, weighting), donate_argnums=0)   # as the Trainer does
    sched = make_schedule(schedule, dataset, CFG.tasks, batch_size=BATCH, seed=0, model_config=CFG)

    sizes, masks = [], set()
    COUNTER.count, COUNTER.active = 0, True
    for epoch in range(2):
        for clips, batch, mask in sched.steps(epoch):
            state, metrics = step(state, batch, mask)
            jax.device_get(metrics)
            sizes.append(len(clips))
            masks.add(tuple(mask))
            if len(sizes) == 1:
                assert step._cache_size() == 1
                assert COUNTER.count >= 1, "the counter must see the first step's compilation"
                COUNTER.count = 0   # count from the second step on
        # Between epochs the plateau schedule rewrites the learning rate in the state.
        state = state._replace(opt_state=set_learning_rate(state.opt_state, 1e-4 * (epoch + 1)))
    COUNTER.active = False
    # The pipeline really varied: a short last batch (padded), and for round robin every task mask.
    assert 3 in sizes and BATCH in sizes
    assert len(masks) == (4 if schedule == "round_robin" else 1)
    assert step._cache_size() == 1
    assert COUNTER.count == 0, f"{COUNTER.count} compilation(s) after the first step"

    eval_step = jax.jit(make_eval_step(CFG))
    COUNTER.count = 0
    for i, start in enumerate(range(0, N_CLIPS, BATCH)):
        idx = np.arange(start, min(start + BATCH, N_CLIPS))
        batch = pad_batch({k: v for k, v in dataset.batch(idx).items() if k in MODEL_INPUTS}, BATCH)
        jax.device_get(eval_step(state.params, state.batch_stats, batch))
        if i == 0:
            COUNTER.active = True
    COUNTER.active = False
    assert eval_step._cache_size() == 1 and COUNTER.count == 0

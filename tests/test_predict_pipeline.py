"""`mtjax.predict`'s pipelined loop: same predictions as the serial loop it replaced (bit for
bit, bf16 features cast on the host included), batch i+1 dispatched before batch i is
fetched, and the benchmark's predict mode timing that loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.bench import random_dataset, run_spec
from mtjax.config import tiny_model_config
from mtjax.data import check_batch
from mtjax.data.batching import pad_batch
from mtjax.models.hiccap import MODEL_INPUTS, init_variables
from mtjax.predict import host_inputs, make_eval_fn, pipelined_predict, predict_dataset

BATCH = 4
CLIPS = 11  # not a multiple of BATCH: the last batch has 3 real rows and one padded


def serial_predictions(config, variables, dataset, batch_size):
    """The loop `predict_dataset` ran before the pipeline: float32 features, one batch at a
    time, each result fetched before the next batch is built."""
    eval_fn = make_eval_fn(config)
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)))
        batch = dataset.batch(idx)
        check_batch(batch, config)
        probs = jax.device_get(eval_fn(variables, pad_batch({k: batch[k] for k in MODEL_INPUTS}, batch_size)))
        yield start, {t: np.asarray(probs[t][:len(idx)]) for t in config.tasks}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipelined_predictions_equal_the_serial_loop(dtype):
    config = tiny_model_config(dtype=dtype, tasks=("sarcasm", "gory", "mature"))  # not sorted
    variables = init_variables(config, jax.random.PRNGKey(0))
    dataset = random_dataset(config, CLIPS, seed=3)

    expected = list(serial_predictions(config, variables, dataset, BATCH))
    got = list(predict_dataset(config, variables, dataset, BATCH))

    assert [s for s, _ in got] == [s for s, _ in expected] == [0, 4, 8]
    for (_, want), (_, have) in zip(expected, got):
        assert list(have) == list(config.tasks)  # the model's task order, not jit's sorted keys
        for t in config.tasks:
            assert have[t].shape == want[t].shape and have[t].dtype == want[t].dtype
            np.testing.assert_array_equal(have[t], want[t])
    assert got[-1][1]["sarcasm"].shape == (CLIPS - 2 * BATCH, 2)
    # Not vacuous: the clips get different probabilities.
    assert np.ptp(np.concatenate([p["sarcasm"][:, 1] for _, p in got])) > 0


def test_features_cross_in_the_compute_dtype_and_the_rest_as_read():
    dataset = random_dataset(tiny_model_config(), 3, seed=0)
    for dtype in ("float32", "bfloat16"):
        inputs = host_inputs(tiny_model_config(dtype=dtype), dataset.batch(np.arange(3)), BATCH)
        assert inputs["video"].dtype == inputs["audio"].dtype == jnp.dtype(dtype)
        assert inputs["text"].dtype == np.int32
        assert all(inputs[k].dtype == np.float32 for k in ("text_mask", "video_mask", "audio_mask", "example_mask"))
        assert len(inputs["video"]) == BATCH


def test_next_batch_is_dispatched_before_the_previous_result_is_fetched():
    events = []

    def tagged_inputs():
        for k in range(3):
            events.append(f"build {k}")
            yield k, {"x": np.full(2, k, np.float32)}

    def eval_fn(variables, inputs):
        events.append(f"dispatch {int(inputs['x'][0])}")
        return inputs["x"] * variables

    results = []
    for k, out in pipelined_predict(eval_fn, 2.0, tagged_inputs()):
        events.append(f"fetched {k}")
        results.append((k, out.tolist()))

    assert results == [(0, [0.0, 0.0]), (1, [2.0, 2.0]), (2, [4.0, 4.0])]
    assert events == ["build 0", "dispatch 0", "build 1", "dispatch 1", "fetched 0",
                      "build 2", "dispatch 2", "fetched 1", "fetched 2"]


def test_bench_predict_mode_times_the_pipelined_stream():
    record = run_spec({"mode": "jax-predict-bf16", "batch": 2, "steps": 2, "warmup": 1, "smoke": True})
    assert "error" not in record, record.get("error")
    assert record["ms"] > 0 and len(record["times_ms"]) == 2
    assert record["clips_per_s"] == pytest.approx(2 / (record["ms"] / 1e3))

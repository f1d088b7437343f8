"""The model boundary's trace-time chex guards: wrong shapes/dtypes never reach XLA."""

import jax
import numpy as np
import pytest

from mtjax.config import tiny_model_config
from mtjax.models import HICCAP, init_variables
from mtjax.models.hiccap import dummy_batch


@pytest.fixture(scope="module")
def model_and_vars():
    config = tiny_model_config()
    return config, HICCAP(config), init_variables(config, jax.random.PRNGKey(0))


@pytest.mark.parametrize("key, bad, expected", [
    ("video", np.zeros((2, 5, 20), np.float32), "(2, 6, 20)"),
    ("audio", np.zeros((2, 7, 13), np.float32), "(2, 7, 12)"),
    ("text", np.zeros((2, 23), np.int32), "(2, 24)"),
    ("text_mask", np.zeros((2, 25), np.float32), "(2, 24)"),
    ("text", np.zeros((2, 24), np.float32), "int"),
    ("video", np.zeros((2, 6, 20), np.int32), "float"),
])
def test_wrong_inputs_are_rejected_with_the_expected_shape_or_type(model_and_vars, key, bad, expected):
    config, model, variables = model_and_vars
    batch = dummy_batch(config)
    batch[key] = bad
    with pytest.raises(AssertionError, match="Chex") as info:
        model.apply(variables, batch)
    assert expected in str(info.value)


def test_well_formed_batch_passes(model_and_vars):
    config, model, variables = model_and_vars
    out = model.apply(variables, dummy_batch(config, 3))
    assert set(out) == set(config.tasks)
    assert all(p.shape == (3, 2) for p in out.values())


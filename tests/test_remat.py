"""bert.remat_attention_probs: the same attention and gradients, fewer saved activations."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from mtjax.config import tiny_model_config
from mtjax.models.hiccap import HICCAP, MODEL_INPUTS, init_variables
from tests._support import random_batch


def _configs(**bert_overrides):
    base = tiny_model_config(text_len=32)
    base = base.replace(bert=dataclasses.replace(base.bert, **bert_overrides))
    remat = base.replace(bert=dataclasses.replace(base.bert, remat_attention_probs=True))
    return base, remat


def test_same_outputs_and_gradients():
    base, remat = _configs()
    variables = init_variables(base, jax.random.PRNGKey(0))
    batch = random_batch(base, 4, seed=1)
    inputs = {k: batch[k] for k in MODEL_INPUTS}

    def loss(params, cfg):
        probs = HICCAP(cfg).apply({**variables, "params": params}, inputs, train=False)
        return sum(jnp.sum(jnp.log(p[:, 1])) for p in probs.values())

    la, ga = jax.value_and_grad(loss)(variables["params"], base)
    lb, gb = jax.value_and_grad(loss)(variables["params"], remat)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)


def _saved_score_sized(cfg, batch_size=4):
    """How many (B, H, L, L) arrays autodiff keeps for the backward pass of a train-mode
    forward with dropout on (what XLA must then hold in memory)."""
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    inputs = {k: v for k, v in random_batch(cfg, batch_size, seed=1).items() if k in MODEL_INPUTS}

    def loss(params):
        probs, _ = HICCAP(cfg).apply({**variables, "params": params}, inputs, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.PRNGKey(2)})
        return sum(jnp.sum(jnp.log(p[:, 1])) for p in probs.values())

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, variables["params"])
    shape = f"[{batch_size},{cfg.bert.num_attention_heads},{cfg.text_len},{cfg.text_len}]"
    return sum(shape in line for line in out.getvalue().splitlines())


def test_backward_keeps_only_the_scores():
    base, remat = _configs(attention_probs_dropout_prob=0.1)
    layers = base.bert.num_hidden_layers
    kept_base, kept_remat = _saved_score_sized(base), _saved_score_sized(remat)
    # Written out: the probabilities, the dropout mask and the dropped probabilities per
    # layer; with remat the scores alone.
    assert kept_base >= 3 * layers, kept_base
    assert kept_remat == layers, kept_remat

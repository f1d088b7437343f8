"""Eval- and train-mode parity of the Flax model with the PyTorch reference (fp32, CPU).

Tolerance: 1e-5 max abs difference for every block and end to end.

Speed: the conversion of a (config, seed) reference is cached, and the Flax forward is
jit-compiled once per (config, mode) (op-by-op `apply` of the tiny model takes ~10 s).
The reference itself is rebuilt for every test (milliseconds): train-mode forwards update
its BatchNorm running stats, so a shared one would leak state between tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.reference import build_reference, multitask_original_loss
from mtjax.config import tiny_model_config
from mtjax.models import HICCAP
from tests._support import flax_variables_from_reference, max_abs_diff, random_batch, torch_inputs

TOL = 1e-5

# Flax capture key → reference forward_blocks key
BLOCKS = {
    "bert": "bert", "rnn_img": "rnn_img", "rnn_audio": "rnn_audio",
    "rnn_img_drop_norm": "rnn_img_drop_norm", "rnn_audio_drop_norm": "rnn_audio_drop_norm",
    "sequential_image": "img", "sequential_audio": "aud",
    "att1_first": "att1.drop_norm1", "att1": "att1.out",
    "att2_first": "att2.drop_norm1", "att2": "att2.out",
    "att3_first": "att3.drop_norm1", "att3": "att3.out",
    "pooled_text": "pooled_text", "pooled_audio": "pooled_aud", "pooled_image": "pooled_img",
    "features": "features",
}


@functools.lru_cache(maxsize=None)
def converted(config, seed, dropout_off=False):
    """(flax config, variables) of `build_reference(config, seed, dropout_off)`, converted once.
    build_reference is deterministic, so a fresh reference with the same arguments has
    exactly these weights."""
    return flax_variables_from_reference(build_reference(config, seed=seed, dropout_off=dropout_off), config)


@functools.lru_cache(maxsize=None)
def jitted_forward(flax_config, train):
    """jit of `HICCAP.apply` with dropout off, returning (outputs, capture dict)."""
    model = HICCAP(flax_config)

    def forward(variables, batch):
        capture = {}
        out = model.apply(variables, batch, train=train, deterministic=True, capture=capture,
                          mutable=["batch_stats"] if train else False)
        return out, capture

    return jax.jit(forward)


def run_both(config, seed=0, batch_size=4, train=False):
    reference = build_reference(config, seed=seed, dropout_off=train)
    reference.train(train)
    flax_config, variables = converted(config, seed, dropout_off=train)
    batch = random_batch(config, batch_size, seed=seed + 10, with_labels=False)
    out, capture = jitted_forward(flax_config, train)(variables, batch)
    with torch.no_grad():
        blocks = reference.forward_blocks(*torch_inputs(batch))
    return capture, blocks, out, reference


@pytest.mark.parametrize("variant", ["multitask", "binary"])
@pytest.mark.parametrize("pooling", ["faithful", "stable"])
def test_every_block_matches_in_eval_mode(variant, pooling):
    config = tiny_model_config(variant=variant, pooling=pooling)
    capture, blocks, _, _ = run_both(config)
    for flax_key, ref_key in BLOCKS.items():
        assert capture[flax_key].shape == tuple(blocks[ref_key].shape), flax_key
        assert max_abs_diff(capture[flax_key], blocks[ref_key].numpy()) <= TOL, flax_key
    for task in config.tasks:
        assert max_abs_diff(capture[f"logits_{task}"], blocks[f"logits.{task}"].numpy()) <= TOL, task
        assert max_abs_diff(capture[f"logits_{task}"], blocks[f"logits.{task}"].numpy()) <= TOL


def test_variants_differ_only_from_att3():
    caps = {v: run_both(tiny_model_config(variant=v))[0] for v in ("multitask", "binary")}
    assert max_abs_diff(caps["multitask"]["att2"], caps["binary"]["att2"]) == 0.0
    assert max_abs_diff(caps["multitask"]["att3"], caps["binary"]["att3"]) > 1e-3


def test_project_per_branch_is_eval_invariant():
    a = run_both(tiny_model_config(project_per_branch=True))[0]
    b = run_both(tiny_model_config(project_per_branch=False))[0]
    assert max_abs_diff(a["features"], b["features"]) == 0.0


def test_end_to_end_probabilities_match():
    config = tiny_model_config()
    _, blocks, out, _ = run_both(config, seed=3, batch_size=6)
    for task in config.tasks:
        assert max_abs_diff(out[task], blocks[f"probs.{task}"].numpy()) <= TOL


def test_heads_in_train_mode_and_batchnorm_running_stats():
    """Train mode (batch statistics, dropout off): outputs and the BN running-stat update."""
    config = tiny_model_config()
    capture, blocks, (out, updates), reference = run_both(config, seed=5, batch_size=5, train=True)
    for task in config.tasks:
        assert max_abs_diff(out[task], blocks[f"probs.{task}"].numpy()) <= TOL
    for task in config.tasks:
        head = reference.heads[task]
        for flax_bn, torch_index in (("bn0", 1), ("bn1", 4)):
            stats = updates["batch_stats"][f"heads_{task}"][flax_bn]
            assert max_abs_diff(stats["mean"], head[torch_index].running_mean.numpy()) <= TOL
            assert max_abs_diff(stats["var"], head[torch_index].running_var.numpy()) <= TOL


def test_batchnorm_example_mask_ignores_padding_rows():
    """A batch padded to a fixed shape gives the statistics of the unpadded one."""
    from mtjax.data.batching import pad_batch
    from mtjax.models.hiccap import MODEL_INPUTS

    config = tiny_model_config()
    fc, variables = converted(config, 1, dropout_off=True)
    batch = {k: v for k, v in random_batch(config, 3, seed=2, with_labels=False).items() if k in MODEL_INPUTS}
    forward = jitted_forward(fc, True)
    (out, upd), _ = forward(variables, batch)
    (out_p, upd_p), _ = forward(variables, pad_batch(batch, 8))
    for t in fc.tasks:
        assert max_abs_diff(out[t], out_p[t][:3]) <= TOL
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(upd_p)):
        assert max_abs_diff(a, b) <= TOL


def test_gradients_of_original_multitask_loss_match():
    """d(0.1·mature + 0.4·gory + 0.2·slapstick + 0.2·sarcasm)/dθ for every parameter, ≤1e-4 relative."""
    from convert.reference import unified_state_dict
    from convert.weights import Readable, map_readable, readable_from_unified
    from mtjax.losses import ORIGINAL_MULTITASK_WEIGHTS, masked_bce
    from flax import traverse_util

    config = tiny_model_config()
    reference = build_reference(config, seed=7, dropout_off=True)
    reference.train(True)
    flax_config, variables = flax_variables_from_reference(reference, config)
    batch = random_batch(config, 6, seed=8)

    probs = reference(*torch_inputs(batch))
    labels = {t: torch.from_numpy(batch["labels"][t]) for t in config.tasks}
    multitask_original_loss(probs, labels).backward()
    torch_grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
                   for name, p in reference.named_parameters()}
    # Push the gradients through the converter's own renames (grads share the params' names).
    grads_sd = unified_state_dict(reference)
    grads_sd = {k: (torch_grads.get(_readable_name(k), v) if k != "loss_weights" else v)
                for k, v in grads_sd.items()}
    mapped = map_readable(readable_from_unified({k: v.detach().numpy() for k, v in grads_sd.items()}))

    model = HICCAP(flax_config)

    def loss_fn(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                             train=True, deterministic=True, mutable=["batch_stats"])
        return sum(w * masked_bce(out[t], batch["labels"][t]) for t, w in ORIGINAL_MULTITASK_WEIGHTS.items())

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss_fn))(variables["params"]))
    checked = 0
    for key, g in grads.items():
        expected = mapped.variables[("params", *key)]
        g = np.asarray(g)
        if _gradient_is_analytically_zero(key):
            assert np.linalg.norm(g) <= 1e-7 and np.linalg.norm(expected) <= 1e-7, "/".join(key)
        else:
            rel = np.linalg.norm(g - expected) / max(np.linalg.norm(expected), 1e-12)
            assert rel <= 1e-4, ("/".join(key), rel)
        checked += 1
    assert checked == len(jax.tree_util.tree_leaves(variables["params"]))


def _gradient_is_analytically_zero(key: tuple[str, ...]) -> bool:
    """Parameters whose exact gradient is 0, where both frameworks return rounding noise
    (~1e-9) that has no meaningful relative error, so they are compared in absolute terms:
    - a key bias adds one constant to every score of a query row; softmax is shift-invariant;
    - a bias feeding (through linear maps only) a train-mode BatchNorm shifts every example
      equally, and BatchNorm subtracts the batch mean: the pooled drop-norm biases and the
      heads' `linear0`/`bn0`/`linear1` biases.
    """
    name = "/".join(key)
    return (key[-2:] == ("key", "bias")
            or (name.startswith("attention") and "_drop_norm/norm/bias" in name)
            or (key[0].startswith("heads_") and key[1] in ("linear0", "bn0", "linear1") and key[2] == "bias"))


def _readable_name(unified_key: str) -> str:
    """unified key → the reference's named_parameters() name."""
    import re

    if unified_key.startswith("base_model."):
        return unified_key[len("base_model."):]
    m = re.fullmatch(r"task_heads\.(\w+)\.text_audio_image_linear\.(.+)", unified_key)
    return f"heads.{m.group(1)}.{m.group(2)}"


def test_lstm_matches_torch_for_several_depths():
    from flax import traverse_util

    from mtjax.models.lstm import BiLSTM
    from convert.weights import Readable, map_readable

    for layers, in_dim, hidden in ((1, 5, 3), (3, 7, 4)):
        torch.manual_seed(layers)
        lstm = torch.nn.LSTM(in_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        x = np.random.default_rng(layers).normal(size=(3, 9, in_dim)).astype(np.float32)
        with torch.no_grad():
            expected = lstm(torch.from_numpy(x))[0].numpy()
        readable = Readable({f"rnn_img.{k}": v.detach().numpy() for k, v in lstm.state_dict().items()}, {})
        params = traverse_util.unflatten_dict({k[2:]: v for k, v in map_readable(readable).variables.items()})
        got = BiLSTM(hidden, layers).apply({"params": params}, jnp.asarray(x))
        assert max_abs_diff(got, expected) <= TOL


def test_lstms_run_together_equal_lstms_run_one_by_one():
    """`run_together` (HICCAP's video and audio LSTMs in one scan, the shorter padded in
    time) computes each LSTM's own outputs and gradients; mismatched sizes run one by one."""
    import flax.linen as nn

    from mtjax.models import lstm as lstm_mod
    from mtjax.models.lstm import BiLSTM, run_together

    class Pair(nn.Module):
        hidden_b: int = 4

        def setup(self):
            self.a, self.b = BiLSTM(4, 2), BiLSTM(self.hidden_b, 2)

        def __call__(self, xa, xb):
            return run_together([self.a, self.b], [xa, xb])

    rng = np.random.default_rng(0)
    xa = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)   # 5 steps
    xb = jnp.asarray(rng.normal(size=(3, 11, 2)), jnp.float32)  # 11 steps
    for hidden_b in (4, 3):  # 3: not joinable, the fallback
        pair = Pair(hidden_b)
        variables = pair.init(jax.random.key(0), xa, xb)
        loss = lambda v: sum(jnp.sum(jnp.sin(o)) for o in pair.apply(v, xa, xb))
        separate = [BiLSTM(4, 2).apply({"params": variables["params"]["a"]}, xa),
                    BiLSTM(hidden_b, 2).apply({"params": variables["params"]["b"]}, xb)]
        assert len(pair.apply(variables, xa, xb)) == 2
        for got, want in zip(pair.apply(variables, xa, xb), separate):
            assert got.shape == want.shape and max_abs_diff(got, want) <= 1e-6
        try:
            lstm_mod.JOINT_SCAN = False
            want_grads = jax.grad(loss)(variables)
        finally:
            lstm_mod.JOINT_SCAN = True
        got_grads = jax.grad(loss)(variables)
        for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
            assert max_abs_diff(g, w) <= 1e-6

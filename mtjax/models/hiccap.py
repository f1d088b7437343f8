"""HICCAP: BERT text, LSTM video/audio, hierarchical cross-attention fusion, task heads."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.config import ModelConfig
from mtjax.models.bert import FlaxBert
from mtjax.models.fusion import AdditivePooling, CrossBranch, DropNorm, Projection
from mtjax.models.heads import TaskHead
from mtjax.models.lstm import BiLSTM, run_together

MODEL_INPUTS = ("text", "text_mask", "video", "video_mask", "audio", "audio_mask")


class HICCAP(nn.Module):
    """Maps a batch (see docs/ARCHITECTURE.md) to `{task: softmax probabilities (B, 2)}`.

    Submodules carry the PyTorch names (`bert`, `rnn_img`, `att1`, `attention_audio`, ...)
    so the conversion table reads like the original. Heads are `heads_<task>`.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        d = c.hidden_size
        dt, drop = jnp.dtype(c.dtype), c.dropout_impl
        self.bert = FlaxBert(c.bert, dt)
        self.rnn_img = BiLSTM(c.lstm_hidden, c.lstm_layers, dt, c.lstm_impl)
        self.rnn_img_drop_norm = DropNorm(0.2, dt, drop)
        self.rnn_audio = BiLSTM(c.lstm_hidden, c.lstm_layers, dt, c.lstm_impl)
        self.rnn_audio_drop_norm = DropNorm(0.2, dt, drop)
        self.sequential_audio = Projection(d, dt, drop)
        self.sequential_image = Projection(d, dt, drop)
        self.att1 = CrossBranch(d, c.fusion_heads, dt, drop)
        self.att2 = CrossBranch(d, c.fusion_heads, dt, drop)
        self.att3 = CrossBranch(d, c.fusion_heads, dt, drop)
        self.attention = AdditivePooling(d, c.pooling, dt)
        self.attention_drop_norm = DropNorm(0.2, dt, drop)
        self.attention_audio = AdditivePooling(d, c.pooling, dt)
        self.attention_audio_drop_norm = DropNorm(0.2, dt, drop)
        self.attention_image = AdditivePooling(d, c.pooling, dt)
        self.attention_image_drop_norm = DropNorm(0.2, dt, drop)
        self.heads = {task: TaskHead(c.head_dims, dt, drop) for task in c.tasks}

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False,
                 deterministic: bool | None = None, capture: dict | None = None):
        """`train` puts BatchNorm in batch-statistics mode; `deterministic` (default
        `not train`) turns dropout off. `capture`, when a dict, receives every block's
        output for layer-by-layer checks."""
        if deterministic is None:
            deterministic = not train
        features = self.shared_features(batch, deterministic=deterministic, capture=capture)
        return self.task_probs(features, batch.get("example_mask"), train=train,
                               deterministic=deterministic, capture=capture)

    def shared_features(self, batch: Mapping[str, jax.Array], *, deterministic: bool,
                        capture: dict | None = None) -> jax.Array:
        """Everything the tasks share: inputs → the pooled (B, 3d) features the heads read.
        (Applied on its own with `method='shared_features'` for feature-level MTL.)"""
        c = self.config
        assert_model_inputs(batch, c)
        dt = jnp.dtype(c.dtype)
        keep = _keeper(capture)

        text_mask = batch["text_mask"].astype(jnp.float32)
        video_mask = batch["video_mask"].astype(jnp.float32)
        audio_mask = batch["audio_mask"].astype(jnp.float32)

        text = self.bert(batch["text"], deterministic=deterministic)
        keep("bert", text)

        video_seq, audio_seq = run_together([self.rnn_img, self.rnn_audio],
                                            [batch["video"].astype(dt), batch["audio"].astype(dt)])
        keep("rnn_img", video_seq)
        keep("rnn_audio", audio_seq)
        video_seq = self.rnn_img_drop_norm(video_seq, deterministic=deterministic)
        keep("rnn_img_drop_norm", video_seq)
        audio_seq = self.rnn_audio_drop_norm(audio_seq, deterministic=deterministic)
        keep("rnn_audio_drop_norm", audio_seq)

        # The original re-applies the projections in every branch (fresh dropout each time);
        # without dropout every application is identical, so compute them once.
        fresh_per_branch = c.project_per_branch and not deterministic
        project = lambda: (self.sequential_image(video_seq, deterministic=deterministic),
                           self.sequential_audio(audio_seq, deterministic=deterministic))
        img, aud = project()
        keep("sequential_image", img)
        keep("sequential_audio", aud)

        out_text = self.att1(text, img, video_mask, aud, audio_mask, deterministic=deterministic,
                             capture=capture, prefix="att1")
        if fresh_per_branch:
            img, aud = project()
        out_aud = self.att2(aud, img, video_mask, text, text_mask, deterministic=deterministic,
                            capture=capture, prefix="att2")
        if fresh_per_branch:
            img, aud = project()
        if c.variant == "binary":
            out_img = self.att3(img, text, text_mask, aud, audio_mask, deterministic=deterministic,
                                capture=capture, prefix="att3")
        else:
            out_img = self.att3(img, aud, audio_mask, text, text_mask, deterministic=deterministic,
                                capture=capture, prefix="att3")
        keep("att1", out_text)
        keep("att2", out_aud)
        keep("att3", out_img)

        # The original pools with a mask of all ones: padding is pooled too.
        pool = lambda pooling, drop_norm, h: drop_norm(
            pooling(h, jnp.ones(h.shape[:2], jnp.float32)), deterministic=deterministic)
        pooled_text = pool(self.attention, self.attention_drop_norm, out_text)
        pooled_aud = pool(self.attention_audio, self.attention_audio_drop_norm, out_aud)
        pooled_img = pool(self.attention_image, self.attention_image_drop_norm, out_img)
        keep("pooled_text", pooled_text)
        keep("pooled_audio", pooled_aud)
        keep("pooled_image", pooled_img)
        features = jnp.concatenate([pooled_text, pooled_aud, pooled_img], axis=-1)
        keep("features", features)
        return features

    def task_probs(self, features: jax.Array, example_mask: jax.Array | None = None, *, train: bool,
                   deterministic: bool, capture: dict | None = None) -> dict[str, jax.Array]:
        """The task heads on the shared features: `{task: softmax probabilities (B, 2)}`."""
        c = self.config
        keep = _keeper(capture)
        probs = {}
        for task in c.tasks:
            logits = self.heads[task](features, train=train, deterministic=deterministic,
                                      mask=example_mask)
            keep(f"logits_{task}", logits)
            probs[task] = jax.nn.softmax(logits, axis=-1)
        return probs


def _keeper(capture: dict | None):
    """`keep(name, x)` records x in `capture` when one is given, else does nothing."""
    return (lambda name, x: capture.__setitem__(name, x)) if capture is not None else (lambda *_: None)


def assert_model_inputs(batch: Mapping[str, jax.Array], config: ModelConfig) -> None:
    """Trace-time guard at the model boundary (free at run time): shapes and dtypes the
    config fixes. Value checks (finite features, mask/padding alignment) happen on the
    host in `mtjax.data.check_batch`, before data reaches the device."""
    c = config
    b = batch["text"].shape[0]
    chex.assert_shape(batch["text"], (b, c.text_len))
    chex.assert_type(batch["text"], int)
    chex.assert_shape([batch["text_mask"]], (b, c.text_len))
    chex.assert_shape(batch["video"], (b, c.video_len, c.video_dim))
    chex.assert_shape(batch["video_mask"], (b, c.video_len))
    chex.assert_shape(batch["audio"], (b, c.audio_len, c.audio_dim))
    chex.assert_shape(batch["audio_mask"], (b, c.audio_len))
    chex.assert_type([batch["video"], batch["audio"]], float)
    if "example_mask" in batch:
        chex.assert_shape(batch["example_mask"], (b,))


def dummy_batch(config: ModelConfig, batch_size: int = 2) -> dict[str, jax.Array]:
    """A well-formed all-padding batch, for shape-only work such as `init`."""
    c = config
    return {
        "text": jnp.zeros((batch_size, c.text_len), jnp.int32),
        "text_mask": jnp.zeros((batch_size, c.text_len), jnp.float32),
        "video": jnp.zeros((batch_size, c.video_len, c.video_dim), jnp.float32),
        "video_mask": jnp.zeros((batch_size, c.video_len), jnp.float32),
        "audio": jnp.zeros((batch_size, c.audio_len, c.audio_dim), jnp.float32),
        "audio_mask": jnp.zeros((batch_size, c.audio_len), jnp.float32),
    }


def init_variables(config: ModelConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh `{'params', 'batch_stats'}` for `config` (eval-mode init: no dropout rng needed)."""
    return _compiled_init(config)(key)


@functools.lru_cache(maxsize=16)
def _compiled_init(config: ModelConfig):
    # One compile per config (configs are frozen and hashable), not one per call.
    model = HICCAP(config)
    return jax.jit(lambda k: model.init(k, dummy_batch(config), train=False))

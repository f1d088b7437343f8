"""Tests of the PyTorch HICCAP reference (convert/reference.py) on the tiny config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convert import reference as ref
from mtjax.config import tiny_model_config

B = 4


def make_batch(cfg, seed=0, batch=B):
    """A batch in the original conventions: text left-padded, video/audio right-padded."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, cfg.text_len, dtype=torch.long)
    text_mask = torch.zeros(batch, cfg.text_len)
    video = torch.zeros(batch, cfg.video_len, cfg.video_dim)
    video_mask = torch.zeros(batch, cfg.video_len)
    audio = torch.zeros(batch, cfg.audio_len, cfg.audio_dim)
    audio_mask = torch.zeros(batch, cfg.audio_len)
    for i in range(batch):
        n_tok = 3 + (5 * i) % (cfg.text_len - 3)
        text[i, -n_tok:] = torch.randint(1, cfg.bert.vocab_size, (n_tok,), generator=g)
        text[i, -n_tok] = 101 % cfg.bert.vocab_size
        text_mask[i, -n_tok:] = 1
        n_v = 1 + (2 * i) % cfg.video_len
        video[i, :n_v] = torch.randn(n_v, cfg.video_dim, generator=g)
        video_mask[i, :n_v] = 1
        n_a = 1 + (3 * i) % cfg.audio_len
        audio[i, :n_a] = torch.randn(n_a, cfg.audio_dim, generator=g)
        audio_mask[i, :n_a] = 1
    return text, text_mask, video, video_mask, audio, audio_mask


def eval_probs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(*batch)


def assert_same_outputs(a, b, atol=0.0):
    assert list(a) == list(b)
    for t in a:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def cfg():
    return tiny_model_config()


@pytest.fixture(scope="module")
def batch(cfg):
    return make_batch(cfg)


# ---- forward behaviour ------------------------------------------------------------------------

def test_shapes_and_probs_sum_to_one(cfg, batch):
    model = ref.build_reference(cfg, seed=0)
    out = eval_probs(model, batch)
    assert list(out) == list(cfg.tasks)
    for probs in out.values():
        assert probs.shape == (B, 2)
        torch.testing.assert_close(probs.sum(-1), torch.ones(B))


def test_forward_blocks_keys_shapes_and_consistency(cfg, batch):
    model = ref.build_reference(cfg, seed=0).eval()
    d, H = cfg.hidden_size, cfg.lstm_hidden
    with torch.no_grad():
        blocks = model.forward_blocks(*batch)
        probs = model(*batch)
    expected = {
        "bert": (B, cfg.text_len, d),
        "rnn_img": (B, cfg.video_len, 2 * H), "rnn_audio": (B, cfg.audio_len, 2 * H),
        "rnn_img_drop_norm": (B, cfg.video_len, 2 * H), "rnn_audio_drop_norm": (B, cfg.audio_len, 2 * H),
        "img": (B, cfg.video_len, d), "aud": (B, cfg.audio_len, d),
        "pool_text_raw": (B, d), "pool_aud_raw": (B, d), "pool_img_raw": (B, d),
        "pooled_text": (B, d), "pooled_aud": (B, d), "pooled_img": (B, d),
        "features": (B, 3 * d),
    }
    for name, length in (("att1", cfg.text_len), ("att2", cfg.audio_len), ("att3", cfg.video_len)):
        for part in ("attn1", "drop_norm1", "attn2", "drop_norm2", "out"):
            expected[f"{name}.{part}"] = (B, length, d)
    for t in cfg.tasks:
        expected[f"logits.{t}"] = (B, 2)
        expected[f"probs.{t}"] = (B, 2)
    assert {k: tuple(v.shape) for k, v in blocks.items()} == expected
    # Features are text, audio, image in that order; the residuals are as the SPEC says.
    torch.testing.assert_close(blocks["features"],
                               torch.cat([blocks["pooled_text"], blocks["pooled_aud"], blocks["pooled_img"]], -1))
    torch.testing.assert_close(blocks["att1.out"], blocks["att1.drop_norm2"] + blocks["bert"])
    torch.testing.assert_close(blocks["att2.out"], blocks["att2.drop_norm2"] + blocks["aud"])
    torch.testing.assert_close(blocks["att3.out"], blocks["att3.drop_norm2"] + blocks["img"])
    for t in cfg.tasks:
        torch.testing.assert_close(blocks[f"probs.{t}"], probs[t], rtol=0, atol=0)
        torch.testing.assert_close(blocks[f"probs.{t}"], torch.softmax(blocks[f"logits.{t}"], -1))


def test_bert_is_called_with_ids_only(cfg, batch):
    model = ref.build_reference(cfg, seed=0).eval()
    with torch.no_grad():
        blocks = model.forward_blocks(*batch)
        plain = model.bert(input_ids=batch[0]).last_hidden_state
        masked = model.bert(input_ids=batch[0], attention_mask=batch[1].long()).last_hidden_state
    torch.testing.assert_close(blocks["bert"], plain, rtol=0, atol=0)
    assert not torch.allclose(blocks["bert"], masked)  # left padding is attended to


def test_cross_attention_matches_manual_formula(cfg):
    torch.manual_seed(0)
    d, heads = cfg.hidden_size, cfg.fusion_heads
    att = ref.BertOutAttention(d, heads).eval()
    h, ctx = torch.randn(2, 5, d), torch.randn(2, 7, d)
    mask = torch.tensor([[1.0] * 7, [1.0] * 3 + [0.0] * 4])
    with torch.no_grad():
        got = att(h, ctx, mask)
        hs = d // heads
        outs = []
        for k in range(heads):
            sl = slice(k * hs, (k + 1) * hs)
            q = att.query(h)[..., sl]
            kk = att.key(ctx)[..., sl]
            v = att.value(ctx)[..., sl]
            s = q @ kk.transpose(1, 2) / math.sqrt(hs) + ((1 - mask) * -10000.0)[:, None, :]
            outs.append(torch.softmax(s, -1) @ v)
        want = torch.cat(outs, -1)
    torch.testing.assert_close(got, want)
    assert not any(isinstance(m, nn.Linear) and m not in (att.query, att.key, att.value)
                   for m in att.modules())  # no output projection


def test_train_and_eval_differ_through_batchnorm(cfg, batch):
    model = ref.build_reference(cfg, seed=0, dropout_off=True)
    ev = eval_probs(model, batch)
    model.train()
    with torch.no_grad():
        tr = model(*batch)
    for t in cfg.tasks:
        assert not torch.allclose(tr[t], ev[t], atol=1e-4)


def test_dropout_off_sets_every_rate_to_zero(cfg):
    model = ref.build_reference(cfg, seed=0, dropout_off=True)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert model.bert.config.hidden_dropout_prob == 0.0
    assert model.bert.config.attention_probs_dropout_prob == 0.0
    assert all(m.dropout.p == 0.0 for m in (model.att1, model.att2, model.att3))
    on = ref.build_reference(cfg, seed=0)
    assert {m.p for m in on.modules() if isinstance(m, nn.Dropout)} >= {0.1, 0.2, 0.3}
    assert on.bert.config.hidden_dropout_prob == cfg.bert.hidden_dropout_prob


def test_dropout_off_makes_train_mode_deterministic(cfg, batch):
    model = ref.build_reference(cfg, seed=0, dropout_off=True).train()
    with torch.no_grad():
        a, b = model(*batch), model(*batch)
    assert_same_outputs(a, b)
    noisy = ref.build_reference(cfg, seed=0).train()
    with torch.no_grad():
        a, b = noisy(*batch), noisy(*batch)
    assert any(not torch.allclose(a[t], b[t]) for t in cfg.tasks)


def test_batchnorm_defaults_and_running_stats_update(cfg, batch):
    model = ref.build_reference(cfg, seed=0, dropout_off=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2 * len(cfg.tasks)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns)
    before = model.heads["gory"][1].running_mean.clone()
    model.train()
    with torch.no_grad():
        model(*batch)
    assert not torch.equal(before, model.heads["gory"][1].running_mean)


def test_variants_differ_with_same_weights(cfg, batch):
    multi = ref.build_reference(cfg, seed=0)
    binary = ref.HICCAPReference(cfg.replace(variant="binary"))
    binary.load_state_dict(multi.state_dict())
    a, b = eval_probs(multi, batch), eval_probs(binary, batch)
    for t in cfg.tasks:
        assert not torch.allclose(a[t], b[t], atol=1e-5)
    # Only att3 depends on the variant.
    with torch.no_grad():
        ba, bb = multi.forward_blocks(*batch), binary.forward_blocks(*batch)
    torch.testing.assert_close(ba["att1.out"], bb["att1.out"], rtol=0, atol=0)
    torch.testing.assert_close(ba["att2.out"], bb["att2.out"], rtol=0, atol=0)
    assert not torch.allclose(ba["att3.out"], bb["att3.out"])


def test_project_per_branch_agrees_in_eval_mode(cfg, batch):
    per_branch = ref.build_reference(cfg, seed=0)
    once = ref.HICCAPReference(cfg.replace(project_per_branch=False))
    once.load_state_dict(per_branch.state_dict())
    assert_same_outputs(eval_probs(per_branch, batch), eval_probs(once, batch))  # bit-identical


# ---- pooling ----------------------------------------------------------------------------------

def test_pooling_matches_formula_and_overflows(cfg):
    torch.manual_seed(0)
    d = cfg.hidden_size
    pool = ref.Attention(d)
    h = torch.randn(2, 5, d)
    ones = torch.ones(2, 5)
    with torch.no_grad():
        s = torch.tanh(pool.linear(h)) @ pool.v
        want = (torch.softmax(s, -1).unsqueeze(-1) * h).sum(1)
        torch.testing.assert_close(pool(h, ones), want)
        pool.v.mul_(1000.0)  # |s| far above 88: exp overflows
        s = torch.tanh(pool.linear(h)) @ pool.v
        assert s.max() > 88
        assert not torch.isfinite(pool(h, ones)).all()


def test_faithful_pooling_gives_non_finite_model_output(cfg, batch):
    model = ref.build_reference(cfg, seed=0).eval()
    with torch.no_grad():
        model.attention.v.mul_(1000.0)
        blocks = model.forward_blocks(*batch)
    assert not torch.isfinite(blocks["pool_text_raw"]).all()
    assert not torch.isfinite(blocks[f"probs.{cfg.tasks[0]}"]).all()


# ---- losses -----------------------------------------------------------------------------------

def test_losses():
    probs = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.3, 0.7]])
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Per element -(y log p + (1-y) log(1-p)), logs clamped at -100, mean over B x 2.
    logp = torch.clamp(torch.log(probs), min=-100)
    log1mp = torch.clamp(torch.log(1 - probs), min=-100)
    want = -(onehot * logp + (1 - onehot) * log1mp).mean()
    torch.testing.assert_close(ref.original_bce(probs, onehot), want)
    pt = {t: probs for t in ref.MULTITASK_ORIGINAL_WEIGHTS}
    lt = {t: onehot for t in ref.MULTITASK_ORIGINAL_WEIGHTS}
    torch.testing.assert_close(ref.multitask_original_loss(pt, lt), (0.1 + 0.4 + 0.2 + 0.2) * want)
    with pytest.raises(KeyError):
        ref.multitask_original_loss({"gory": probs}, {"gory": onehot})


def test_l2_constant_is_a_float_without_gradient(cfg):
    model = ref.build_reference(cfg, seed=0)
    c = ref.binary_original_l2_constant(model)
    assert isinstance(c, float)
    want = 0.1 * sum(math.sqrt(float((p.detach().double() ** 2).sum())) for p in model.parameters())
    assert c == pytest.approx(want, rel=1e-5)


# ---- checkpoint formats -----------------------------------------------------------------------

HEAD_KEYS = {f"{i}.{n}" for i in (0, 3, 6, 7) for n in ("weight", "bias")} | {
    f"{i}.{n}" for i in (1, 4)
    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_original_state_dict_keys(cfg):
    model = ref.build_reference(cfg, seed=0)
    sd = ref.original_state_dict(model)
    for key in ("features.1.weight_ih_l0_reverse", "features.1.weight_hh_l1", "features.1.bias_hh_l1_reverse",
                "features.3.weight_ih_l0", "features.2.1.weight", "features.4.1.bias",
                "features.5.0.weight", "features.5.1.weight", "features.6.0.bias",
                "features.7.query.weight", "features.13.value.bias", "features.8.1.weight",
                "features.15.1.bias", "features.16.v", "features.16.linear.weight",
                "features.21.1.weight", "features.0.embeddings.word_embeddings.weight",
                "features.0.encoder.layer.1.attention.self.query.weight", "features.0.pooler.dense.weight",
                "img_audio_text_linear_gory.4.running_var", "img_audio_text_linear_mature.7.bias"):
        assert key in sd, key
    assert {int(k.split(".")[1]) for k in sd if k.startswith("features.")} == set(range(22))
    assert sd["features.5.0.weight"].shape == (cfg.hidden_size, 2 * cfg.lstm_hidden)
    assert sd["features.1.weight_ih_l0"].shape == (4 * cfg.lstm_hidden, cfg.video_dim)
    assert sd["features.1.weight_ih_l1"].shape == (4 * cfg.lstm_hidden, 2 * cfg.lstm_hidden)
    for t in cfg.tasks:
        prefix = f"img_audio_text_linear_{t}."
        assert {k[len(prefix):] for k in sd if k.startswith(prefix)} == HEAD_KEYS
    assert sd["img_audio_text_linear_gory.1.num_batches_tracked"].dtype == torch.long
    assert not any(k.startswith(("heads.", "sequential.")) or "position_ids" in k for k in sd)

    no_heads = ref.original_state_dict(model, heads=False)
    assert not any(k.startswith("img_audio_text_linear") for k in no_heads)
    extra = ref.original_state_dict(model, include_unused_sequential=True, include_position_ids=True)
    assert extra["sequential.0.weight"].shape == (100, 512)
    assert extra["sequential.1.running_var"].shape == (100,)
    assert extra["sequential.2.weight"].shape == (40, 100)
    assert extra["sequential.3.num_batches_tracked"].dtype == torch.long
    assert extra["sequential.4.weight"].shape == (20, 40)
    assert extra["features.0.embeddings.position_ids"].shape == (1, cfg.bert.max_position_embeddings)


def test_binary_head_name(cfg):
    model = ref.build_reference(cfg.replace(tasks=("binary",), variant="binary"), seed=0)
    sd = ref.original_state_dict(model)
    prefix = "img_audio_text_linear."
    assert {k[len(prefix):] for k in sd if k.startswith(prefix)} == HEAD_KEYS
    assert not any(k.startswith("img_audio_text_linear_") for k in sd)


def test_unified_state_dict_keys(cfg):
    model = ref.build_reference(cfg, seed=0)
    sd = ref.unified_state_dict(model)
    for key in ("task_heads.gory.text_audio_image_linear.7.bias",
                "task_heads.mature.text_audio_image_linear.1.running_mean",
                "base_model.rnn_img.weight_ih_l0_reverse", "base_model.rnn_audio_drop_norm.1.weight",
                "base_model.sequential_image.0.weight", "base_model.attention_image.v",
                "base_model.att3_drop_norm2.1.bias", "base_model.bert.embeddings.LayerNorm.weight"):
        assert key in sd, key
    assert sd["loss_weights"].shape == (len(cfg.tasks),) and sd["loss_weights"].dtype == torch.float32
    for t in cfg.tasks:
        prefix = f"task_heads.{t}.text_audio_image_linear."
        assert {k[len(prefix):] for k in sd if k.startswith(prefix)} == HEAD_KEYS
    assert all(k == "loss_weights" or k.startswith(("base_model.", "task_heads.")) for k in sd)


def test_original_round_trip(cfg, batch, tmp_path):
    src = ref.build_reference(cfg, seed=0)
    path = ref.save_original_checkpoint(src, tmp_path / "orig.pth", epoch=5, score=0.61,
                                        include_unused_sequential=True, include_position_ids=True)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state", "epoch", "score", "optimizer"}
    opt = raw["optimizer"]
    assert len(opt["state"]) == len(list(src.parameters()))
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(opt["state"][0])
    assert float(opt["state"][0]["exp_avg"].abs().sum()) > 0

    dst = ref.build_reference(cfg, seed=1)
    assert any(not torch.allclose(eval_probs(dst, batch)[t], eval_probs(src, batch)[t]) for t in cfg.tasks)
    meta = ref.load_original_checkpoint(dst, path)
    assert meta["epoch"] == 5 and meta["score"] == 0.61 and meta["not_loaded"] == []
    assert_same_outputs(eval_probs(src, batch), eval_probs(dst, batch))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_save_does_not_touch_the_model(cfg, tmp_path):
    model = ref.build_reference(cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref.save_original_checkpoint(model, tmp_path / "a.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_pretraining_checkpoint_has_no_heads(cfg, batch, tmp_path):
    src = ref.build_reference(cfg, seed=0)
    path = ref.save_original_checkpoint(src, tmp_path / "pre.pth", heads=False)
    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith("img_audio_text_linear") for k in raw["model_state"])
    dst = ref.build_reference(cfg, seed=1)
    heads_before = {k: v.clone() for k, v in dst.heads.state_dict().items()}
    meta = ref.load_original_checkpoint(dst, path)
    assert meta["not_loaded"] and all(k.startswith("heads.") for k in meta["not_loaded"])
    assert all(torch.equal(heads_before[k], v) for k, v in dst.heads.state_dict().items())
    dst.eval(), src.eval()
    with torch.no_grad():
        a, b = src.forward_blocks(*batch), dst.forward_blocks(*batch)
    torch.testing.assert_close(a["features"], b["features"], rtol=0, atol=0)


def test_unified_round_trip(cfg, batch, tmp_path):
    ucfg = cfg.replace(variant="binary", project_per_branch=False)
    src = ref.build_reference(ucfg, seed=0)
    lw = torch.tensor([0.5, 1.0, 1.5, 2.0])
    path = ref.save_unified_checkpoint(src, tmp_path / "unified.pt", loss_weights=lw)
    raw = torch.load(path, weights_only=True)
    assert "loss_weights" in raw and "model_state" not in raw
    dst = ref.build_reference(ucfg, seed=1)
    meta = ref.load_unified_checkpoint(dst, path)
    torch.testing.assert_close(meta["loss_weights"], lw)
    assert_same_outputs(eval_probs(src, batch), eval_probs(dst, batch))


def test_loading_mismatched_checkpoint_fails(cfg, tmp_path):
    src = ref.build_reference(cfg.replace(tasks=("binary",), variant="binary"), seed=0)
    path = ref.save_original_checkpoint(src, tmp_path / "bin.pth")
    with pytest.raises(KeyError):
        ref.load_original_checkpoint(ref.build_reference(cfg, seed=0), path)


def test_hf_bert_dir(cfg, batch, tmp_path):
    from transformers import BertModel

    model = ref.build_reference(cfg, seed=0).eval()
    out = ref.hf_bert_dir(model, tmp_path / "bert")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    loaded = BertModel.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch[0]).last_hidden_state,
                                   model.bert(input_ids=batch[0]).last_hidden_state, rtol=0, atol=0)
    for f in tmp_path.rglob("*"):
        if f.suffix in (".bin", ".pt", ".pth"):
            torch.load(f, weights_only=True)


def test_backward_reaches_every_used_parameter(cfg, batch):
    model = ref.build_reference(cfg, seed=0, dropout_off=True).train()
    probs = model(*batch)
    labels = {t: F.one_hot(torch.arange(B) % 2, 2).float() for t in cfg.tasks}
    ref.multitask_original_loss(probs, labels).backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]  # pooler unused
    # nn.Embedding(padding_idx=0): the [PAD] row never gets a gradient in PyTorch.
    assert model.bert.embeddings.word_embeddings.weight.grad[0].abs().sum() == 0

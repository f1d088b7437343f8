"""PyTorch checkpoint → `python -m convert.weights` → `python -m mtjax.predict` on data in the
original on-disk layout: the probabilities equal the PyTorch reference's own eval-mode output.

The reference is fed arrays this test pads itself from the raw files it wrote (SPEC §1
conventions), not the project's reader, so a padding mistake anywhere in the pipeline shows.
Both CLIs run in-process through their `main` (test_convert.py runs one in a subprocess).
Tolerance: 1e-5 max abs difference per probability.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convert import weights as convert_cli
from convert.reference import build_reference, save_original_checkpoint, save_unified_checkpoint
from mtjax import predict as predict_cli
from mtjax.checkpoint import load_model_config
from mtjax.config import tiny_model_config

TOL = 1e-5
# Tiny sizes (video_dim 20, audio_dim 12, vocab 120) with the original's 12 fusion heads:
# the head count is not in the weights and the converter assumes the original's 12 (SPEC §2.4).
CFG = tiny_model_config(fusion_heads=12)


def _clips(lengths) -> list[dict]:
    """Clip specs: (name, IMDBid, text tokens, video frames or None, audio rows or None, labels)."""
    text_len, video_len, audio_len = lengths
    return [
        dict(clip="plain", imdb="tt001_1", tokens=12, video=4, audio=5, label=1),
        dict(clip="no_vggish", imdb="tt002_3", tokens=30, video=9, audio=None, label=0),
        # Longer than every padding length: the original keeps the first tokens/rows.
        dict(clip="too_long", imdb="tt003_2", tokens=text_len + 9, video=video_len + 5,
             audio=audio_len + 4, label=1),
        dict(clip="unlabelled", imdb="tt004_1", tokens=7, video=2, audio=3, label=None),
        dict(clip="no_i3d", imdb="tt005_5", tokens=3, video=None, audio=6, label=1),
        dict(clip="tiny", imdb="tt006_1", tokens=2, video=1, audio=1, label=0),
        dict(clip="full_text", imdb="tt007_2", tokens=text_len, video=video_len, audio=audio_len, label=1),
    ]


def write_dataset(root: Path, lengths, seed: int = 0):
    """Writes the original layout; returns (json path, i3d dir, vggish dir, raw arrays by clip)."""
    rng = np.random.default_rng(seed)
    i3d, vgg = root / "i3d_vecs_extended_merged", root / "vgg_vecs_extended_merged"
    for d in (root / "processed_data", i3d, vgg):
        d.mkdir(parents=True, exist_ok=True)
    records, raw = {}, {}
    for k, spec in enumerate(_clips(lengths)):
        ids = [101] + rng.integers(1, CFG.bert.vocab_size, spec["tokens"] - 1).tolist()
        rec = {"id": k, "IMDBid": spec["imdb"], "indexes": ids, "words": [f"w{i}" for i in ids]}
        if spec["label"] is not None:
            lab = spec["label"]
            rec.update(label=lab, y=[1 - lab, lab])
            for t in ("mature", "gory", "slapstick", "sarcasm"):
                present = int(lab and rng.random() < 0.5)
                rec[t] = [1 - present, present]
        records[spec["clip"]] = rec
        video = audio = None
        if spec["video"] is not None:
            rgb = rng.normal(size=(spec["video"], CFG.video_dim)).astype(np.float32)
            flow = rng.normal(size=(spec["video"], CFG.video_dim)).astype(np.float32)
            np.save(i3d / f"{spec['imdb']}_rgb.npy", rgb)
            np.save(i3d / f"{spec['imdb']}_flow.npy", flow)
            video = rgb + flow  # the model input is the element-wise sum
        if spec["audio"] is not None:
            audio = rng.normal(size=(spec["audio"], CFG.audio_dim)).astype(np.float32)
            np.save(vgg / f"{spec['imdb']}_vggish.npy", audio)
        raw[spec["clip"]] = (np.asarray(ids, np.int64), video, audio)
    data_json = root / "processed_data" / "test_features_lrec_camera.json"
    data_json.write_text(json.dumps(records))
    return data_json, i3d, vgg, raw


def padded_inputs(raw, lengths):
    """SPEC §1: text left-padded (first text_len tokens kept), video/audio right-padded;
    a missing VGGish file is one zero row (mask 1 on it); missing I3D is zeros with mask 0."""
    text_len, video_len, audio_len = lengths
    n = len(raw)
    text = np.zeros((n, text_len), np.int64)
    text_mask = np.zeros((n, text_len), np.float32)
    video = np.zeros((n, video_len, CFG.video_dim), np.float32)
    video_mask = np.zeros((n, video_len), np.float32)
    audio = np.zeros((n, audio_len, CFG.audio_dim), np.float32)
    audio_mask = np.zeros((n, audio_len), np.float32)
    for i, (ids, v, a) in enumerate(raw.values()):
        ids = ids[:text_len]
        text[i, text_len - len(ids):] = ids
        text_mask[i, text_len - len(ids):] = 1
        if v is not None:
            s = min(len(v), video_len)
            video[i, :s], video_mask[i, :s] = v[:s], 1
        if a is None:
            a = np.zeros((1, CFG.audio_dim), np.float32)
        s = min(len(a), audio_len)
        audio[i, :s], audio_mask[i, :s] = a[:s], 1
    return [torch.from_numpy(x) for x in (text, text_mask, video, video_mask, audio, audio_mask)]


def convert_and_predict(tmp_path, capsys, checkpoint: Path, reference, extra_args=()):
    bert_json = tmp_path / "bert_config.json"
    bert_json.write_text(json.dumps(CFG.bert.to_hf_dict()))
    model_dir = tmp_path / "model"
    assert convert_cli.main(["--source", str(checkpoint), "--out", str(model_dir),
                             "--bert-config", str(bert_json)]) == 0, capsys.readouterr().err
    config = load_model_config(model_dir)
    assert config.variant == reference.config.variant
    assert config.project_per_branch == reference.config.project_per_branch
    assert config.fusion_heads == reference.config.fusion_heads == 12
    # Lengths cannot be read from weights: the converter keeps the original's 36/63 and
    # BERT's max positions (40 here) for the text; the data is written around them.
    lengths = (config.text_len, config.video_len, config.audio_len)
    assert lengths == (CFG.bert.max_position_embeddings, 36, 63)

    data_json, i3d, vgg, raw = write_dataset(tmp_path / "data", lengths)
    out = tmp_path / "predictions.jsonl"
    with pytest.warns(UserWarning, match="VGGish"):  # the reader reports the missing file
        code = predict_cli.main(["--checkpoint", str(model_dir), "--data-json", str(data_json),
                                 "--i3d-dir", str(i3d), "--vggish-dir", str(vgg), "--out", str(out),
                                 "--batch-size", "4", *extra_args])  # 7 clips: a full batch and a padded one
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text().splitlines()]

    reference.eval()
    with torch.no_grad():
        expected = reference(*padded_inputs(raw, lengths))
    return config, raw, data_json, lines, expected


def check_predictions(config, raw, data_json, lines, expected):
    records = json.loads(data_json.read_text())
    assert [r["clip"] for r in lines] == list(raw)  # one line per clip, dataset order, unlabelled too
    for i, r in enumerate(lines):
        assert set(r) == {"clip", "IMDBid", "probs"}
        assert r["IMDBid"] == records[r["clip"]]["IMDBid"]
        assert list(r["probs"]) == list(config.tasks)
        for task, p in r["probs"].items():
            assert isinstance(p, list) and len(p) == 2 and all(isinstance(x, float) for x in p)
            assert abs(sum(p) - 1.0) <= 1e-6
            diff = np.abs(np.asarray(p) - expected[task][i].numpy()).max()
            assert diff <= TOL, (r["clip"], task, diff)
    # Not a vacuous match: the clips get different probabilities.
    first = config.tasks[0]
    assert np.ptp([r["probs"][first][1] for r in lines]) > 1e-3


def test_original_checkpoint_roundtrip(tmp_path, capsys):
    reference = build_reference(CFG, seed=21)  # multi-task variant, four fine-grained heads
    ckpt = save_original_checkpoint(reference, tmp_path / "best_model.pth")
    config, raw, data_json, lines, expected = convert_and_predict(tmp_path, capsys, ckpt, reference)
    assert config.tasks == ("mature", "gory", "slapstick", "sarcasm")
    check_predictions(config, raw, data_json, lines, expected)


def test_unified_checkpoint_roundtrip(tmp_path, capsys):
    reference = build_reference(CFG.replace(variant="binary", project_per_branch=False,
                                            tasks=("binary", "sarcasm")), seed=22)
    ckpt = save_unified_checkpoint(reference, tmp_path / "unified.pth")
    # With another attention kernel chosen at predict time (on a CPU 'flash' runs the same
    # function written out): the predictions still match PyTorch.
    config, raw, data_json, lines, expected = convert_and_predict(tmp_path, capsys, ckpt, reference,
                                                                  ["--attention", "flash"])
    assert config.tasks == ("binary", "sarcasm")
    check_predictions(config, raw, data_json, lines, expected)


def test_predict_with_missing_checkpoint(tmp_path, capsys):
    data_json, i3d, vgg, _ = write_dataset(tmp_path / "data", (CFG.text_len, CFG.video_len, CFG.audio_len))
    missing = tmp_path / "no_such_model"
    code = predict_cli.main(["--checkpoint", str(missing), "--data-json", str(data_json),
                             "--i3d-dir", str(i3d), "--vggish-dir", str(vgg),
                             "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"mtjax.predict: error: {missing}: checkpoint directory not found" in err
    assert not (tmp_path / "p.jsonl").exists()

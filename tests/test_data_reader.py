"""Reader for the original on-disk layout: padding, masks, missing files, rejections, batch guard."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from mtjax.config import ModelConfig, tiny_model_config
from mtjax.data import ClipDataset, DataError, DataWarning, check_batch, load_split, split_paths

CFG = tiny_model_config()  # text_len 24, video_len 6, audio_len 7, video_dim 20, audio_dim 12, vocab 120
ALL_TASKS = ("binary", "mature", "gory", "slapstick", "sarcasm")
REAL_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "val_features_lrec_camera.json"


def rec(imdb, tokens=(101, 5, 6, 102), label=1, **over):
    r = {"id": 1, "IMDBid": imdb, "indexes": list(tokens), "words": ["w"] * len(tokens),
         "label": label, "y": [1 - label, label],
         "mature": [0, 1] if label else [1, 0], "gory": [1, 0], "slapstick": [1, 0], "sarcasm": [1, 0]}
    r.update(over)
    return r


def feats(rng, s, dim):
    return rng.standard_normal((s, dim)).astype(np.float32)


class Layout:
    """A tiny on-disk split in the original layout."""

    def __init__(self, root: Path):
        self.root = root
        self.json, self.i3d, self.vgg = split_paths(root, "train")
        for p in (self.json.parent, self.i3d, self.vgg):
            p.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng(0)

    def write_json(self, data):
        self.json.write_text(json.dumps(data))

    def add(self, imdb, video_s=3, audio_s=4, rgb=True, flow=True, vggish=True, flow_s=None):
        out = {}
        if rgb:
            out["rgb"] = feats(self.rng, video_s, CFG.video_dim)
            np.save(self.i3d / f"{imdb}_rgb.npy", out["rgb"])
        if flow:
            out["flow"] = feats(self.rng, video_s if flow_s is None else flow_s, CFG.video_dim)
            np.save(self.i3d / f"{imdb}_flow.npy", out["flow"])
        if vggish:
            out["vggish"] = feats(self.rng, audio_s, CFG.audio_dim)
            np.save(self.vgg / f"{imdb}_vggish.npy", out["vggish"])
        return out

    def load(self, **kw):
        kw.setdefault("model_config", CFG)
        return load_split(self.json, self.i3d, self.vgg, **kw)


@pytest.fixture
def lay(tmp_path):
    return Layout(tmp_path)


def quiet_load(lay, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return lay.load(**kw)


# ----------------------------------------------------------------------------- padding


def test_text_left_padding_and_truncation(lay):
    short = [101, 7, 8, 9, 102]
    long = [101] + list(range(1, 30)) + [102]  # 31 tokens > text_len 24
    lay.write_json({"a_1": rec("a_1", short), "b_1": rec("b_1", long), "c_1": rec("c_1", [])})
    for k in ("a_1", "b_1", "c_1"):
        lay.add(k)
    ds = lay.load()
    text, mask = ds.arrays["text"], ds.arrays["text_mask"]
    assert text.dtype == np.int32 and mask.dtype == np.float32
    assert text.shape == (3, 24)
    np.testing.assert_array_equal(text[0], [0] * 19 + short)
    np.testing.assert_array_equal(mask[0], [0] * 19 + [1] * 5)
    # Longer rows keep their FIRST text_len tokens ([SEP] is cut off).
    np.testing.assert_array_equal(text[1], long[:24])
    np.testing.assert_array_equal(mask[1], np.ones(24))
    np.testing.assert_array_equal(text[2], np.zeros(24))
    np.testing.assert_array_equal(mask[2], np.zeros(24))
    check_batch(ds.arrays, CFG, require_labels=True)


def test_video_audio_right_padding_truncation_and_rgb_flow_sum(lay):
    lay.write_json({"s_1": rec("s_1"), "l_1": rec("l_1")})
    short = lay.add("s_1", video_s=3, audio_s=4)
    long = lay.add("l_1", video_s=9, audio_s=10)  # longer than video_len 6 / audio_len 7
    ds = lay.load()
    v, vm, a, am = (ds.arrays[k] for k in ("video", "video_mask", "audio", "audio_mask"))
    assert v.shape == (2, 6, 20) and a.shape == (2, 7, 12) and v.dtype == np.float32
    np.testing.assert_allclose(v[0, :3], short["rgb"] + short["flow"], rtol=0, atol=0)
    assert not v[0, 3:].any()
    np.testing.assert_array_equal(vm[0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(a[0, :4], short["vggish"])
    assert not a[0, 4:].any()
    np.testing.assert_array_equal(am[0], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(v[1], (long["rgb"] + long["flow"])[:6])
    np.testing.assert_array_equal(vm[1], np.ones(6))
    np.testing.assert_array_equal(a[1], long["vggish"][:7])
    np.testing.assert_array_equal(am[1], np.ones(7))
    assert ds.missing_counts == {"vggish": 0, "i3d": 0, "i3d_skipped": 0, "rgb_flow_mismatch": 0,
                                 "empty": 0}


def test_rgb_flow_length_mismatch_uses_common_prefix_and_warns(lay):
    lay.write_json({"m_1": rec("m_1")})
    f = lay.add("m_1", video_s=5, flow_s=3)
    with pytest.warns(DataWarning, match="1 with rgb/flow of different lengths"):
        ds = lay.load()
    np.testing.assert_array_equal(ds.arrays["video"][0, :3], f["rgb"][:3] + f["flow"])
    np.testing.assert_array_equal(ds.arrays["video_mask"][0], [1, 1, 1, 0, 0, 0])
    assert ds.missing_counts["rgb_flow_mismatch"] == 1


# ----------------------------------------------------------------------------- missing files


def test_missing_vggish_is_one_zero_row(lay):
    lay.write_json({"a_1": rec("a_1"), "b_1": rec("b_1"), "c_1": rec("c_1")})
    lay.add("a_1")
    lay.add("b_1", vggish=False)
    lay.add("c_1", vggish=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = lay.load()
    ours = [x for x in w if issubclass(x.category, DataWarning)]
    assert len(ours) == 1, "one summary warning per split, not one per clip"
    assert "2 without a VGGish file" in str(ours[0].message)
    assert str(lay.json) in str(ours[0].message)
    assert ds.missing_counts["vggish"] == 2
    assert ds.audio_missing.tolist() == [False, True, True]
    for i in (1, 2):
        assert not ds.arrays["audio"][i].any()
        np.testing.assert_array_equal(ds.arrays["audio_mask"][i], [1, 0, 0, 0, 0, 0, 0])


def test_missing_i3d_zero_filled_or_skipped(lay):
    lay.write_json({"a_1": rec("a_1"), "norgb_1": rec("norgb_1"), "noflow_1": rec("noflow_1")})
    lay.add("a_1")
    lay.add("norgb_1", rgb=False)
    lay.add("noflow_1", flow=False)
    with pytest.warns(DataWarning, match="2 without I3D rgb/flow files"):
        ds = lay.load()
    assert len(ds) == 3 and ds.missing_counts["i3d"] == 2
    for i in (1, 2):
        assert not ds.arrays["video"][i].any()
        assert not ds.arrays["video_mask"][i].any()
        assert ds.arrays["audio_mask"][i].sum() == 4  # audio is still there
    check_batch(ds.arrays, CFG)  # an all-zero video mask is a valid batch

    with pytest.warns(DataWarning, match="2 dropped for missing I3D"):
        sk = lay.load(missing_video="skip")
    assert sk.clips == ["a_1"]
    assert sk.skipped_clips == ["norgb_1", "noflow_1"]
    assert sk.missing_counts["i3d_skipped"] == 2 and sk.missing_counts["i3d"] == 0
    assert sk.arrays["video"].shape[0] == 1 and sk.arrays["labels"]["mature"].shape == (1, 2)


def test_no_feature_dirs_means_all_missing(lay):
    lay.write_json({"a_1": rec("a_1"), "b_1": rec("b_1")})
    with pytest.warns(DataWarning):
        ds = load_split(lay.json, None, None, model_config=CFG)
    assert ds.missing_counts["vggish"] == 2 and ds.missing_counts["i3d"] == 2
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_split(lay.json, lay.root / "nope", None, model_config=CFG)


# ----------------------------------------------------------------------------- labels


def test_labels_and_masks(lay):
    data = {"p_1": rec("p_1", label=1), "n_1": rec("n_1", label=0), "q_1": rec("q_1", label=1)}
    data["q_1"]["gory"] = [0, 1]
    del data["n_1"]["y"]  # only `label`: the one-hot is derived
    lay.write_json(data)
    for k in data:
        lay.add(k)
    ds = lay.load(tasks=ALL_TASKS)
    L, M = ds.arrays["labels"], ds.arrays["label_mask"]
    assert set(L) == set(ALL_TASKS) and L["binary"].dtype == np.float32
    np.testing.assert_array_equal(L["binary"], [[0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(L["gory"], [[1, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(L["mature"], [[0, 1], [1, 0], [0, 1]])
    for t in ALL_TASKS:
        np.testing.assert_array_equal(M[t], [1, 1, 1])

    pos = lay.load(tasks=ALL_TASKS, fine_grained_on_positives=True)
    np.testing.assert_array_equal(pos.arrays["label_mask"]["binary"], [1, 1, 1])
    for t in ("mature", "gory", "slapstick", "sarcasm"):
        np.testing.assert_array_equal(pos.arrays["label_mask"][t], [1, 0, 1])

    only = lay.load(tasks=ALL_TASKS, positives_only=True)
    assert only.clips == ["p_1", "q_1"] and only.dropped_negatives == 1
    np.testing.assert_array_equal(only.arrays["labels"]["gory"], [[1, 0], [0, 1]])
    # Default tasks come from the config: the four fine-grained heads.
    assert set(lay.load().arrays["labels"]) == {"mature", "gory", "slapstick", "sarcasm"}


def test_require_labels_false(lay):
    bare = {"id": 3, "IMDBid": "x_1", "indexes": [101, 4, 102]}
    lay.write_json({"x_1": bare})
    lay.add("x_1")
    ds = lay.load(require_labels=False, tasks=ALL_TASKS)
    assert "labels" not in ds.arrays and "label_mask" not in ds.arrays and not ds.has_labels
    check_batch(ds.arrays, CFG)
    with pytest.raises(DataError, match=r"clip 'x_1'.*missing label field 'mature'"):
        lay.load()
    # Partial labels: present where known, label_mask 0 where not.
    lay.write_json({"x_1": bare, "y_1": rec("y_1")})
    lay.add("y_1")
    with pytest.warns(DataWarning, match="1 without a 'gory' label"):
        part = lay.load(require_labels=False, tasks=("binary", "gory"))
    np.testing.assert_array_equal(part.arrays["label_mask"]["gory"], [0, 1])
    np.testing.assert_array_equal(part.arrays["labels"]["binary"], [[1, 0], [0, 1]])


# ----------------------------------------------------------------------------- rejections


def _expect(lay, data, *fragments, **kw):
    lay.write_json(data)
    with pytest.raises(DataError) as e:
        quiet_load(lay, **kw)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_reject_json_not_an_object(lay):
    _expect(lay, [rec("a_1")], str(lay.json), "expected one JSON object keyed by clip name", "list")


def test_reject_invalid_json(lay):
    lay.json.write_text('{"a_1": {"IMDBid": ')
    with pytest.raises(DataError, match="not valid JSON") as e:
        lay.load()
    assert str(lay.json) in str(e.value)


def test_reject_value_not_object(lay):
    _expect(lay, {"a_1": [1, 2]}, str(lay.json), "clip 'a_1'", "expected an object")


@pytest.mark.parametrize("key", ["IMDBid", "indexes"])
def test_reject_missing_required_key(lay, key):
    r = rec("a_1")
    del r[key]
    _expect(lay, {"a_1": r}, str(lay.json), "clip 'a_1'", f"missing key '{key}'")


def test_reject_missing_label_field(lay):
    r = rec("a_1")
    del r["sarcasm"]
    _expect(lay, {"a_1": r}, "clip 'a_1'", "missing label field 'sarcasm'")
    r = rec("a_1")
    del r["y"], r["label"]
    _expect(lay, {"a_1": r}, "clip 'a_1'", "'y'", "'binary'", tasks=ALL_TASKS)
    # The positives rule needs the binary label even when only fine-grained tasks are asked for.
    _expect(lay, {"a_1": r}, "clip 'a_1'", "'label'", "positive", fine_grained_on_positives=True)


@pytest.mark.parametrize("value", [[1, 1], [0, 0], [0, 1, 0], [0.5, 0.5], "01", [True, False]])
def test_reject_label_not_one_hot(lay, value):
    _expect(lay, {"a_1": rec("a_1", gory=value)}, "clip 'a_1'", "key 'gory'", "one-hot pair")


def test_reject_bad_binary_label(lay):
    _expect(lay, {"a_1": rec("a_1", label=2, y=[0, 1])}, "clip 'a_1'", "key 'label'", "0 or 1",
            tasks=ALL_TASKS)
    _expect(lay, {"a_1": rec("a_1", label=1, y=[1, 0])}, "clip 'a_1'", "key 'y'", "must agree",
            tasks=ALL_TASKS)


@pytest.mark.parametrize("bad", [120, -1, 10**30])
def test_reject_token_id_out_of_range(lay, bad):
    _expect(lay, {"a_1": rec("a_1", tokens=[101 % 120, 3, bad])}, str(lay.json), "clip 'a_1'",
            "key 'indexes'", "position 2", "[0, 120)")


def test_reject_token_not_int(lay):
    _expect(lay, {"a_1": rec("a_1", tokens=[1, 2.5])}, "clip 'a_1'", "key 'indexes'", "integer")


def test_reject_path_like_imdbid(lay):
    _expect(lay, {"a_1": rec("../a_1")}, "clip 'a_1'", "key 'IMDBid'")


def test_reject_feature_wrong_width(lay):
    lay.add("abc_1")
    bad = lay.i3d / "abc_1_rgb.npy"
    np.save(bad, np.zeros((40, 512), np.float32))
    msg = _expect(lay, {"abc_1": rec("abc_1")})
    assert msg == f"clip 'abc_1': {bad} has shape (40, 512), expected (S, 20)"


def test_reject_feature_wrong_ndim(lay):
    lay.add("abc_1")
    np.save(lay.vgg / "abc_1_vggish.npy", np.zeros((12,), np.float32))
    _expect(lay, {"abc_1": rec("abc_1")}, "clip 'abc_1'", "abc_1_vggish.npy", "shape (12,)",
            "expected (S, 12)")


def test_reject_non_finite_features(lay):
    lay.add("abc_1")
    flow = np.zeros((4, 20), np.float32)
    flow[2, 3] = np.nan
    np.save(lay.i3d / "abc_1_flow.npy", flow)
    _expect(lay, {"abc_1": rec("abc_1")}, "clip 'abc_1'", "abc_1_flow.npy", "non-finite", "row 2")
    # float64 values beyond float32's range become inf on conversion: rejected too.
    np.save(lay.i3d / "abc_1_flow.npy", np.full((3, 20), 1e300))
    _expect(lay, {"abc_1": rec("abc_1")}, "abc_1_flow.npy", "non-finite")


def test_reject_invalid_npy_and_pickles(lay):
    lay.add("abc_1")
    (lay.vgg / "abc_1_vggish.npy").write_bytes(b"this is not numpy")
    _expect(lay, {"abc_1": rec("abc_1")}, "clip 'abc_1'", "abc_1_vggish.npy", "not a valid .npy")
    obj = np.empty((2, 12), dtype=object)
    np.save(lay.vgg / "abc_1_vggish.npy", obj, allow_pickle=True)
    _expect(lay, {"abc_1": rec("abc_1")}, "abc_1_vggish.npy", "not a valid .npy")


# ----------------------------------------------------------------------------- dataset API


def test_batches_subset_and_iteration(lay):
    names = [f"c{i}_1" for i in range(7)]
    lay.write_json({n: rec(n, label=i % 2) for i, n in enumerate(names)})
    for n in names[:-1]:
        lay.add(n)
    lay.add(names[-1], vggish=False)
    ds = quiet_load(lay)
    assert isinstance(ds, ClipDataset) and len(ds) == 7 and ds.clips == names
    assert ds.imdb_ids == names and ds.ids.shape == (7,)

    b = ds.batch([6, 0])
    assert b["video"].shape == (2, 6, 20) and b["labels"]["mature"].shape == (2, 2)
    np.testing.assert_array_equal(b["text"][1], ds.arrays["text"][0])
    b["video"][:] = 1.0
    assert ds.arrays["video"][6].sum() != b["video"][0].sum()  # a copy, not a view

    sub = ds.subset([6, 2])
    assert sub.clips == ["c6_1", "c2_1"] and sub.audio_missing.tolist() == [True, False]
    assert sub.missing_counts["vggish"] == 1 and ds.missing_counts["vggish"] == 1

    plain = list(ds.iter_batches(3))
    assert [c for c, _ in plain] == [names[:3], names[3:6], names[6:]]
    assert plain[-1][1]["text"].shape == (1, 24)  # last partial batch is returned as is
    assert len(list(ds.iter_batches(3, drop_last=True))) == 2

    def order(seed):
        return [c for cs, _ in ds.iter_batches(2, shuffle=True, seed=seed) for c in cs]

    assert order(5) == order(5) and sorted(order(5)) == names and order(5) != names
    rng = np.random.default_rng(0)
    e1 = [c for cs, _ in ds.iter_batches(7, shuffle=True, seed=rng) for c in cs]
    e2 = [c for cs, _ in ds.iter_batches(7, shuffle=True, seed=rng) for c in cs]
    assert e1 != e2  # a Generator advances between epochs
    for cs, bt in ds.iter_batches(3, shuffle=True, seed=1):
        np.testing.assert_array_equal(bt["text"], ds.batch([names.index(c) for c in cs])["text"])
    with pytest.raises(ValueError, match="seed"):
        next(ds.iter_batches(2, shuffle=True))


def test_split_paths(tmp_path):
    j, i, v = split_paths(tmp_path, "val")
    assert j == tmp_path / "processed_data" / "val_features_lrec_camera.json"
    assert i == tmp_path / "i3d_vecs_extended_merged" and v == tmp_path / "vgg_vecs_extended_merged"


# ----------------------------------------------------------------------------- check_batch


@pytest.fixture
def good_batch(lay):
    lay.write_json({"a_1": rec("a_1", tokens=[101, 5, 102]), "b_1": rec("b_1", tokens=[101, 9, 9, 9, 102])})
    lay.add("a_1")
    lay.add("b_1", video_s=2)
    ds = lay.load()
    check_batch(ds.arrays, CFG, require_labels=True)
    return ds.batch([0, 1])


def test_check_batch_rejects_reversed_text_mask(good_batch):
    b = good_batch
    # The bug the research notes traced their NaNs to: tokens at the start, mask ones then zeros.
    n = int(b["text_mask"][1].sum())
    ids = b["text"][1][-n:].copy()
    b["text"][1] = 0
    b["text"][1, :n] = ids
    b["text_mask"][1] = b["text_mask"][1][::-1]
    with pytest.raises(DataError, match=r"reversed.*batch row 1"):
        check_batch(b, CFG)


def test_check_batch_rejects_tokens_under_zero_mask(good_batch):
    b = good_batch
    b["text"][0, 0] = 7  # a token in the padding region
    with pytest.raises(DataError, match=r"non-zero token ids where text_mask is 0 in batch row 0"):
        check_batch(b, CFG)


def test_check_batch_rejects_shapes_dtypes_nan_and_masks(good_batch):
    def fails(mutate, *fragments, cfg=CFG):
        b = {k: (dict(v) if isinstance(v, dict) else v.copy()) for k, v in good_batch.items()}
        mutate(b)
        with pytest.raises(DataError) as e:
            check_batch(b, cfg)
        for f in fragments:
            assert f in str(e.value), (f, str(e.value))

    fails(lambda b: b.__setitem__("video", b["video"][:, :, :10]), "batch[video]", "(2, 6, 10)",
          "video_dim=20")
    fails(lambda b: b.__setitem__("audio_mask", b["audio_mask"][:1]), "batch[audio_mask]", "(1, 7)")
    fails(lambda b: b.__setitem__("text", b["text"].astype(np.int64)), "batch[text]", "int64", "int32")
    fails(lambda b: b.pop("audio"), "lacks keys ['audio']")
    fails(lambda b: b["video"].__setitem__((1, 0, 0), np.nan), "batch[video]", "non-finite", "row 1")
    fails(lambda b: b["audio"].__setitem__((0, 1, 2), np.inf), "batch[audio]", "non-finite", "row 0")
    fails(lambda b: b["video_mask"].__setitem__((0, 0), 0.5), "batch[video_mask]", "0 and 1")
    fails(lambda b: b["video_mask"].__setitem__((0, 0), 0.0), "batch[video_mask]", "ones then zeros")
    fails(lambda b: b["video"].__setitem__((1, 5, 0), 1.0), "batch[video]", "mask is 0", "row 1")
    fails(lambda b: b["labels"].__setitem__("gory", np.ones((2, 2), np.float32)), "'gory'", "one-hot")
    fails(lambda b: b["text"].__setitem__((0, -1), 500), "outside [0, 120)")
    fails(lambda b: b.pop("label_mask"), "go together")
    # The real-size config rejects the tiny batch's shapes.
    fails(lambda b: None, "batch[text]", "text_len=500", cfg=ModelConfig())
    lengths = dict(text_len=24, video_len=6, audio_len=7, video_dim=20, audio_dim=12)
    check_batch(good_batch, lengths)  # a mapping of lengths works too


# ----------------------------------------------------------------------------- real data


def test_real_validation_split():
    if not REAL_VAL.is_file():
        pytest.skip(f"{REAL_VAL} not present")
    with pytest.warns(DataWarning, match="432 without a VGGish file"):
        ds = load_split(REAL_VAL, None, None, require_labels=True, vocab_size=30522, tasks=ALL_TASKS)
    assert len(ds) == 432
    assert int(ds.arrays["labels"]["binary"][:, 1].sum()) == 233
    assert ds.missing_counts["vggish"] == 432 and ds.missing_counts["i3d"] == 432
    lens = ds.arrays["text_mask"].sum(axis=1)
    assert lens.min() == 2 and lens.max() == 299
    assert (ds.arrays["text"][:, -1] == 102).all()  # every transcript ends with [SEP] at the right end
    # Fine-grained positives only among label == 1 clips.
    pos = ds.arrays["labels"]["binary"][:, 1] == 1
    for t in ALL_TASKS[1:]:
        assert not ds.arrays["labels"][t][~pos, 1].any()
    check_batch(ds.batch(np.arange(16)), ModelConfig(tasks=ALL_TASKS), require_labels=True)

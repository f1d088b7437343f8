"""mtjax.metrics against scikit-learn (a test-only dependency) and plain loops."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from mtjax.metrics import compute_metrics, format_metrics_table, majority_baseline

TASKS = ["binary", "mature", "gory", "slapstick", "sarcasm"]


def _onehot(y):
    return np.eye(2, dtype=np.float32)[np.asarray(y, dtype=int)]


def _random_case(seed, n=57, p_pos=0.5, p_mask=0.7, tasks=TASKS):
    rng = np.random.default_rng(seed)
    probs = {t: rng.dirichlet([1.0, 1.0], size=n).astype(np.float32) for t in tasks}
    labels = {t: _onehot(rng.random(n) < p_pos) for t in tasks}
    mask = {t: (rng.random(n) < p_mask).astype(np.float32) for t in tasks}
    return probs, labels, mask


def _sk_task(probs, labels, mask):
    keep = np.asarray(mask) == 1
    yt = np.argmax(labels, 1)[keep]
    yp = np.argmax(probs, 1)[keep]
    return {
        "accuracy": accuracy_score(yt, yp),
        "f1": f1_score(yt, yp, average="binary", pos_label=1, zero_division=0),
        "macro_f1": f1_score(yt, yp, average="macro", zero_division=0),
        "weighted_f1": f1_score(yt, yp, average="weighted", zero_division=0),
        "confusion_matrix": confusion_matrix(yt, yp, labels=[0, 1]).tolist(),
        "support": int(keep.sum()),
    }


def _loop_hamming(probs, labels, mask):
    """Independent, deliberately plain version of hamming score / loss / exact match."""
    tasks = list(probs)
    n = len(probs[tasks[0]])
    fracs, exact = [], []
    for i in range(n):
        right = counted = 0
        for t in tasks:
            if mask is not None and mask[t][i] != 1:
                continue
            counted += 1
            p = 0 if probs[t][i][0] >= probs[t][i][1] else 1
            y = 0 if labels[t][i][0] >= labels[t][i][1] else 1
            right += int(p == y)
        if counted == 0:
            continue
        fracs.append(right / counted)
        exact.append(1.0 if right == counted else 0.0)
    return sum(fracs) / len(fracs), 1 - sum(fracs) / len(fracs), sum(exact) / len(exact)


def _check_against_reference(probs, labels, mask):
    m = compute_metrics(probs, labels, mask)
    json.dumps(m)  # JSON-serialisable, no numpy scalars
    assert list(m["per_task"]) == list(probs)
    f1s = []
    for t in probs:
        ref = _sk_task(probs[t], labels[t], mask[t] if mask is not None else np.ones(len(probs[t])))
        got = m["per_task"][t]
        for k in ("accuracy", "f1", "macro_f1", "weighted_f1"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (t, k)
            assert type(got[k]) is float
        assert got["confusion_matrix"] == ref["confusion_matrix"], t
        assert got["support"] == ref["support"] and type(got["support"]) is int
        f1s.append(ref["f1"])
    assert m["average_f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
    assert m["average_macro_f1"] == pytest.approx(np.mean([m["per_task"][t]["macro_f1"] for t in probs]))
    hs, hl, em = _loop_hamming(probs, labels, mask)
    assert m["hamming_score"] == pytest.approx(hs, abs=1e-12)
    assert m["hamming_loss"] == pytest.approx(hl, abs=1e-12)
    assert m["exact_match"] == pytest.approx(em, abs=1e-12)
    return m


@pytest.mark.parametrize("seed", range(8))
def test_random_with_mask_matches_sklearn(seed):
    _check_against_reference(*_random_case(seed))


@pytest.mark.parametrize("seed", range(3))
def test_random_without_mask_matches_sklearn(seed):
    probs, labels, _ = _random_case(100 + seed)
    m1 = _check_against_reference(probs, labels, None)
    m2 = compute_metrics(probs, labels, {t: np.ones(len(probs[t])) for t in probs})
    assert m1 == m2


@pytest.mark.parametrize("seed", range(4))
def test_imbalanced_matches_sklearn(seed):
    # ~5% positives, sparse masks: many F1 denominators near or at zero
    _check_against_reference(*_random_case(200 + seed, n=80, p_pos=0.05, p_mask=0.4))


def test_original_masking_pattern():
    # the original scores the fine-grained tasks only on clips with binary label 1
    rng = np.random.default_rng(7)
    n = 64
    probs = {t: rng.dirichlet([1, 1], n) for t in TASKS}
    binary = rng.random(n) < 0.55
    labels = {"binary": _onehot(binary)}
    labels.update({t: _onehot(binary & (rng.random(n) < 0.4)) for t in TASKS[1:]})
    mask = {"binary": np.ones(n)}
    mask.update({t: binary.astype(np.float64) for t in TASKS[1:]})
    _check_against_reference(probs, labels, mask)


def test_degenerate_cases_match_sklearn():
    n = 12
    y0 = _onehot(np.zeros(n))
    y1 = _onehot(np.ones(n))
    probs = {
        "no_pos_pred_neg": y0.copy(),  # no true and no predicted positives: F1 0, macro 1
        "no_pos_some_pred": _onehot(np.arange(n) % 3 == 0),  # no true positives, some predicted
        "all_pos_right": y1.copy(),  # only positives, all right: F1 1
        "all_wrong": y0.copy(),  # only positives, all predicted negative
        "one_counted": _onehot(np.arange(n) == 4),
    }
    labels = {"no_pos_pred_neg": y0, "no_pos_some_pred": y0, "all_pos_right": y1,
              "all_wrong": y1, "one_counted": _onehot(np.arange(n) == 4)}
    mask = {t: np.ones(n) for t in probs}
    mask["one_counted"] = (np.arange(n) == 4).astype(float)
    m = _check_against_reference(probs, labels, mask)
    assert m["per_task"]["no_pos_pred_neg"]["f1"] == 0.0
    assert m["per_task"]["no_pos_pred_neg"]["macro_f1"] == 1.0
    assert m["per_task"]["all_pos_right"]["f1"] == 1.0
    assert m["per_task"]["all_wrong"]["accuracy"] == 0.0


def test_ties_predict_class_zero():
    probs = {"a": np.full((4, 2), 0.5)}
    labels = {"a": _onehot([0, 1, 0, 1])}
    m = compute_metrics(probs, labels)
    assert m["per_task"]["a"]["confusion_matrix"] == [[2, 0], [2, 0]]


def test_empty_task_is_left_out_of_averages():
    probs, labels, mask = _random_case(5, n=30)
    mask["sarcasm"] = np.zeros(30)
    m = compute_metrics(probs, labels, mask)
    s = m["per_task"]["sarcasm"]
    assert s["support"] == 0 and s["confusion_matrix"] == [[0, 0], [0, 0]]
    assert s["f1"] == s["accuracy"] == 0.0
    others = [m["per_task"][t]["f1"] for t in TASKS[:-1]]
    assert m["average_f1"] == pytest.approx(np.mean(others))
    # hamming still matches the loop, which simply never counts that task
    hs, hl, em = _loop_hamming(probs, labels, mask)
    assert (m["hamming_score"], m["hamming_loss"], m["exact_match"]) == pytest.approx((hs, hl, em))


def test_all_masked_out():
    probs, labels, _ = _random_case(6, n=10, tasks=["a", "b"])
    m = compute_metrics(probs, labels, {"a": np.zeros(10), "b": np.zeros(10)})
    assert m["average_f1"] == 0.0 and m["hamming_score"] == 0.0 and m["hamming_loss"] == 1.0
    assert m["exact_match"] == 0.0


def test_hand_computed_example():
    # 3 clips, 2 tasks; clip 2 counts only task a
    probs = {"a": np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]),
             "b": np.array([[0.4, 0.6], [0.6, 0.4], [0.9, 0.1]])}
    labels = {"a": _onehot([0, 1, 0]), "b": _onehot([1, 0, 1])}
    mask = {"a": np.ones(3), "b": np.array([1.0, 1.0, 0.0])}
    m = compute_metrics(probs, labels, mask)
    # clip0: a right, b right -> 1; clip1: both right -> 1; clip2: a wrong -> 0
    assert m["hamming_score"] == pytest.approx(2 / 3)
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["per_task"]["a"]["confusion_matrix"] == [[1, 1], [0, 1]]
    assert m["per_task"]["b"]["support"] == 2


def test_accepts_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    probs, labels, mask = _random_case(9, n=20)
    m_np = compute_metrics(probs, labels, mask)
    m_jx = compute_metrics({t: jnp.asarray(v) for t, v in probs.items()},
                           {t: jnp.asarray(v) for t, v in labels.items()},
                           {t: jnp.asarray(v) for t, v in mask.items()})
    assert m_np == m_jx


# ----------------------------------------------------------------------------- baseline / table
def test_majority_baseline():
    probs, labels, mask = _random_case(11, n=90, p_pos=0.3)
    b = majority_baseline(labels, mask)
    for t in TASKS:
        keep = mask[t] == 1
        yt = np.argmax(labels[t], 1)[keep]
        maj = int(np.bincount(yt, minlength=2).argmax())
        assert b["majority_class"][t] == maj
        assert b["per_task"][t]["accuracy"] == pytest.approx(accuracy_score(yt, np.full_like(yt, maj)))
        assert b["per_task"][t]["f1"] == pytest.approx(
            f1_score(yt, np.full_like(yt, maj), zero_division=0))
    json.dumps(b)


def test_majority_baseline_fit_on_other_split():
    _, train, train_mask = _random_case(12, n=50, p_pos=0.9)
    _, val, val_mask = _random_case(13, n=30, p_pos=0.1)
    b = majority_baseline(val, val_mask, fit_labels=train, fit_mask=train_mask)
    assert all(b["majority_class"][t] == 1 for t in TASKS)
    for t in TASKS:
        assert b["per_task"][t]["confusion_matrix"][0][0] == 0  # never predicts negative


def test_format_metrics_table():
    probs, labels, mask = _random_case(14)
    m = compute_metrics(probs, labels, mask)
    txt = format_metrics_table(m, title="val")
    lines = txt.splitlines()
    assert lines[0] == "val"
    for t in TASKS:
        assert any(line.startswith(t) for line in lines)
    assert f"{m['average_f1']:.4f}" in txt and "hamming loss" in txt
    # fixed width: header, rule and task rows are the same length
    assert len({len(line) for line in lines[1:2 + len(TASKS) + 1]}) == 1


# ----------------------------------------------------------------------------- errors
def test_error_task_sets_differ():
    probs, labels, mask = _random_case(20, n=10)
    bad = dict(labels)
    bad.pop("gory")
    bad["extra"] = labels["binary"]
    with pytest.raises(ValueError, match=r"missing \['gory'\].*extra \['extra'\]"):
        compute_metrics(probs, bad, mask)
    bad_mask = dict(mask)
    bad_mask.pop("sarcasm")
    with pytest.raises(ValueError, match="label_mask.*sarcasm"):
        compute_metrics(probs, labels, bad_mask)


def test_error_shapes_name_task_and_shapes():
    probs, labels, mask = _random_case(21, n=10)
    with pytest.raises(ValueError, match=r"probs\['mature'\].*\(10, 3\)"):
        compute_metrics({**probs, "mature": np.ones((10, 3))}, labels, mask)
    with pytest.raises(ValueError, match=r"'gory'.*\(10, 2\).*\(9, 2\)"):
        compute_metrics(probs, {**labels, "gory": labels["gory"][:9]}, mask)
    with pytest.raises(ValueError, match=r"'binary'.*label_mask shape \(10, 1\)"):
        compute_metrics(probs, labels, {**mask, "binary": np.ones((10, 1))})
    # every task must cover the same clips (hamming compares them clip by clip)
    short = {t: v[:8] for t, v in probs.items()}
    short_l = {t: v[:8] for t, v in labels.items()}
    short["binary"], short_l["binary"] = probs["binary"], labels["binary"]
    with pytest.raises(ValueError, match="same clips"):
        compute_metrics(short, short_l)
    with pytest.raises(ValueError, match=r"labels\['sarcasm'\].*\(10,\)"):
        compute_metrics(probs, {**labels, "sarcasm": np.zeros(10)})


def test_error_values():
    probs, labels, mask = _random_case(22, n=10)
    nan = probs["slapstick"].copy()
    nan[3, 0] = np.nan
    with pytest.raises(ValueError, match="slapstick.*NaN"):
        compute_metrics({**probs, "slapstick": nan}, labels, mask)
    with pytest.raises(ValueError, match="0 or 1"):
        compute_metrics(probs, labels, {**mask, "binary": np.full(10, 0.5)})
    with pytest.raises(ValueError, match="no tasks"):
        compute_metrics({}, {})
    with pytest.raises(ValueError, match="dict"):
        compute_metrics(probs["binary"], labels)
    with pytest.raises(ValueError, match="fit_labels"):
        majority_baseline(labels, mask, fit_labels={"binary": labels["binary"]})

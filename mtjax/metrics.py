"""Evaluation metrics of SPEC §4 (numpy only; no scikit-learn at run time).

Per task, with prediction = argmax of the 2-class probabilities and truth = argmax of the
one-hot label, over the clips whose ``label_mask`` is 1: accuracy, binary F1 (positive class 1),
macro F1, weighted F1, 2x2 confusion matrix (rows = truth, columns = prediction) and support.
Across tasks: ``average_f1`` (mean of the task binary F1s, the model-selection metric),
``average_macro_f1``, hamming score / loss and exact-match accuracy.

Conventions (chosen to equal scikit-learn with ``zero_division=0``):
- an F1 whose denominator is 0 (no true and no predicted positives of that class) is 0;
- macro / weighted F1 average over the classes present in truth or prediction, as
  scikit-learn does when ``labels`` is not given (so a task where every clip is truly and
  predicted negative has macro F1 1.0, binary F1 0.0).
Choices where scikit-learn has no answer:
- a task with no counted clip (support 0) reports 0.0 for every score and is left out of
  ``average_f1`` / ``average_macro_f1`` (it cannot be evaluated; counting it as 0 would only
  shift every model by the same constant). If no task has a counted clip the averages are 0.0.
- hamming score / loss and exact match skip clips with no counted task; with no such clip at
  all they are 0.0 / 1.0 / 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["compute_metrics", "majority_baseline", "format_metrics_table"]


# ----------------------------------------------------------------------------- validation
def _as_2col(name: str, task: str, x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name}[{task!r}] must have shape (N, 2); got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        raise ValueError(f"{name}[{task!r}] must be numeric; got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a).all(axis=1)))
        # argmax of a NaN row silently picks the NaN's index: refuse instead of scoring garbage
        raise ValueError(f"{name}[{task!r}] has {bad} row(s) with NaN/inf values (shape {a.shape})")
    return a


def _check_task_sets(ref: Mapping, other: Mapping, ref_name: str, other_name: str) -> None:
    missing = [t for t in ref if t not in other]
    extra = [t for t in other if t not in ref]
    if missing or extra:
        raise ValueError(
            f"task sets differ: {other_name} is missing {missing} and has extra {extra} "
            f"compared with {ref_name} (tasks {list(ref)})"
        )


def _validate(
    probs: Mapping[str, Any],
    labels: Mapping[str, Any],
    label_mask: Mapping[str, Any] | None,
    names: tuple[str, str, str] = ("probs", "labels", "label_mask"),
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    pn, ln, mn = names
    for name, d in ((pn, probs), (ln, labels)):
        if not isinstance(d, Mapping):
            raise ValueError(f"{name} must be a dict task -> array; got {type(d).__name__}")
    if label_mask is not None and not isinstance(label_mask, Mapping):
        raise ValueError(f"{mn} must be a dict task -> array or None; got {type(label_mask).__name__}")
    if len(probs) == 0:
        raise ValueError(f"{pn} has no tasks")
    _check_task_sets(probs, labels, pn, ln)
    if label_mask is not None:
        _check_task_sets(probs, label_mask, pn, mn)

    tasks = list(probs)
    n_ref: tuple[str, int] | None = None
    P: dict[str, np.ndarray] = {}
    Y: dict[str, np.ndarray] = {}
    M: dict[str, np.ndarray] = {}
    for t in tasks:
        p = _as_2col(pn, t, probs[t])
        y = _as_2col(ln, t, labels[t])
        if p.shape[0] != y.shape[0]:
            raise ValueError(f"task {t!r}: {pn} shape {p.shape} and {ln} shape {y.shape} differ in N")
        n = p.shape[0]
        if label_mask is None:
            m = np.ones(n, dtype=bool)
        else:
            mr = np.asarray(label_mask[t])
            if mr.shape != (n,):
                raise ValueError(
                    f"task {t!r}: {mn} shape {mr.shape} does not match {pn} shape {p.shape} "
                    f"(expected ({n},))"
                )
            mf = mr.astype(np.float64)
            if not np.all((mf == 0) | (mf == 1)):
                raise ValueError(f"task {t!r}: {mn} values must be 0 or 1; got {np.unique(mf)[:5]}")
            m = mf == 1
        # hamming / exact match compare tasks clip by clip, so every task must see the same clips
        if n_ref is None:
            n_ref = (t, n)
        elif n != n_ref[1]:
            raise ValueError(
                f"task {t!r} has {n} clips ({pn} shape {p.shape}) but task {n_ref[0]!r} has {n_ref[1]}; "
                "all tasks must be scored on the same clips"
            )
        P[t], Y[t], M[t] = p, y, m
    return tasks, P, Y, M


# ----------------------------------------------------------------------------- per task
def _f1_from_counts(tp: int, fp: int, fn: int) -> float:
    # F1 = 2TP / (2TP + FP + FN); 0 when undefined (scikit-learn zero_division=0)
    den = 2 * tp + fp + fn
    return 0.0 if den == 0 else 2.0 * tp / den


def _task_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Metrics of one task from integer class vectors (already restricted to counted clips)."""
    n = int(y_true.size)
    cm = np.zeros((2, 2), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    if n == 0:
        return {"accuracy": 0.0, "f1": 0.0, "macro_f1": 0.0, "weighted_f1": 0.0,
                "confusion_matrix": cm.tolist(), "support": 0}
    f1_pos = _f1_from_counts(tp, fp, fn)
    f1_neg = _f1_from_counts(tn, fn, fp)  # class 0 as the positive class
    f1_c = np.array([f1_neg, f1_pos])
    true_c = cm.sum(axis=1)  # support per class in the truth
    pred_c = cm.sum(axis=0)
    present = (true_c + pred_c) > 0  # scikit-learn's labels = unique(y_true ∪ y_pred)
    macro = float(f1_c[present].mean())
    weighted = float((f1_c * true_c).sum() / true_c.sum())
    return {
        "accuracy": float((tn + tp) / n),
        "f1": float(f1_pos),
        "macro_f1": macro,
        "weighted_f1": weighted,
        "confusion_matrix": cm.tolist(),
        "support": n,
    }


# ----------------------------------------------------------------------------- public API
def compute_metrics(
    probs: Mapping[str, Any],
    labels: Mapping[str, Any],
    label_mask: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """SPEC §4 metrics.

    Args:
      probs: {task: (N, 2)} class probabilities (or any scores; only the argmax is used).
      labels: {task: (N, 2)} one-hot labels ``[absent, present]``.
      label_mask: {task: (N,)} 0/1, 1 where the clip counts for that task; None = all count.
        Every dict must have the same tasks and every task the same N.

    Returns a JSON-serialisable dict (plain floats / ints / lists)::

      {"average_f1", "average_macro_f1", "hamming_score", "hamming_loss", "exact_match",
       "per_task": {task: {"accuracy", "f1", "macro_f1", "weighted_f1",
                           "confusion_matrix": [[TN, FP], [FN, TP]], "support"}}}

    Tasks appear in the order of ``probs``.
    """
    tasks, P, Y, M = _validate(probs, labels, label_mask)
    pred = {t: np.argmax(P[t], axis=1) for t in tasks}
    true = {t: np.argmax(Y[t], axis=1) for t in tasks}

    per_task = {t: _task_metrics(true[t][M[t]], pred[t][M[t]]) for t in tasks}
    scored = [t for t in tasks if per_task[t]["support"] > 0]
    avg_f1 = float(np.mean([per_task[t]["f1"] for t in scored])) if scored else 0.0
    avg_macro = float(np.mean([per_task[t]["macro_f1"] for t in scored])) if scored else 0.0

    mask = np.stack([M[t] for t in tasks], axis=1)  # (N, T)
    right = np.stack([pred[t] == true[t] for t in tasks], axis=1)
    counted = mask.sum(axis=1)
    keep = counted > 0
    if keep.any():
        frac_right = (right & mask)[keep].sum(axis=1) / counted[keep]
        hamming_score = float(frac_right.mean())
        exact = float((right | ~mask)[keep].all(axis=1).mean())
    else:
        hamming_score, exact = 0.0, 0.0
    return {
        "average_f1": avg_f1,
        "average_macro_f1": avg_macro,
        "hamming_score": hamming_score,
        "hamming_loss": 1.0 - hamming_score,
        "exact_match": exact,
        "per_task": per_task,
    }


def majority_baseline(
    labels: Mapping[str, Any],
    label_mask: Mapping[str, Any] | None = None,
    *,
    fit_labels: Mapping[str, Any] | None = None,
    fit_mask: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of always predicting each task's majority class.

    The majority is taken over the counted clips of ``fit_labels``/``fit_mask`` when given
    (e.g. the training split, the honest baseline), else over the evaluated ``labels`` themselves.
    Ties and tasks with no counted clip predict class 0 (absent). The result is
    ``compute_metrics``'s dict plus ``"majority_class": {task: 0 or 1}``.
    """
    if not isinstance(labels, Mapping) or len(labels) == 0:
        raise ValueError("labels must be a non-empty dict task -> (N, 2) array")
    if fit_labels is None:
        src, names = (labels, label_mask), ("labels", "labels", "label_mask")
    else:
        _check_task_sets(labels, fit_labels, "labels", "fit_labels")
        src, names = (fit_labels, fit_mask), ("fit_labels", "fit_labels", "fit_mask")
    # validating the labels against themselves gives the same shape/task checks
    tasks, _, Ys, Ms = _validate(src[0], src[0], src[1], names)
    majority: dict[str, int] = {}
    for t in tasks:
        counts = np.bincount(np.argmax(Ys[t], axis=1)[Ms[t]], minlength=2)
        majority[t] = int(np.argmax(counts))  # argmax takes the first on a tie -> class 0
    probs = {}
    for t in labels:
        n = np.asarray(labels[t]).shape[0] if np.ndim(labels[t]) >= 1 else 0
        probs[t] = np.tile(np.eye(2)[majority[t]], (n, 1))
    out = compute_metrics(probs, labels, label_mask)
    out["majority_class"] = {t: majority[t] for t in labels}
    return out


def format_metrics_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A fixed-width text table of ``compute_metrics``'s output, for logs and the CLI."""
    per_task = metrics.get("per_task", {})
    tw = max([len("task")] + [len(str(t)) for t in per_task])
    head = (f"{'task':<{tw}}  {'support':>7}  {'acc':>6}  {'f1':>6}  {'macro_f1':>8}  "
            f"{'w_f1':>6}  {'TN':>6}  {'FP':>6}  {'FN':>6}  {'TP':>6}")
    lines = []
    if title:
        lines.append(title)
    lines += [head, "-" * len(head)]
    for t, m in per_task.items():
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        lines.append(
            f"{str(t):<{tw}}  {m['support']:>7d}  {m['accuracy']:>6.4f}  {m['f1']:>6.4f}  "
            f"{m['macro_f1']:>8.4f}  {m['weighted_f1']:>6.4f}  {tn:>6d}  {fp:>6d}  {fn:>6d}  {tp:>6d}"
        )
    lines.append("-" * len(head))
    summary = [("average_f1", "average F1"), ("average_macro_f1", "average macro F1"),
               ("hamming_score", "hamming score"), ("hamming_loss", "hamming loss"),
               ("exact_match", "exact match")]
    lw = max(len(label) for _, label in summary)
    for key, label in summary:
        if key in metrics:
            lines.append(f"{label:<{lw}}  {float(metrics[key]):.4f}")
    return "\n".join(lines)

"""Task schedules: which clips and which tasks make each train step (SPEC §4).

A schedule turns an epoch of the train split into steps `(clips, batch, task_mask)`.
Batches are padded to a fixed number of rows per schedule and `task_mask` (T,) selects the
tasks whose losses count, so every step has one shape and the compiled step never
recompiles. Schedules see the per-step task losses (`observe`) and each epoch's validation
metrics (`end_epoch`); their state is host-side, derived from (seed, epoch) where possible,
and the rest is JSON (`state_dict`) saved in the run checkpoints.

| name | source | steps |
|---|---|---|
| `all_at_once` | SPEC §4 | every task on every batch of the whole split |
| `round_robin` | SPEC §4 | one step per task on each batch (T steps per batch) |
| `one_at_a_time` | SPEC §4 | task after task, each for its own epochs, on its own stream |
| `dynamic_difficulty_sampling` | SPEC §4 (the research code, fixed) | per-task slices sized by recent loss shares |
| `dsg` | Lu et al. 2020, "12-in-1" §4 (Dynamic Stop-and-Go) | stopped tasks only every `iter_gap` steps |
| `curriculum` | SPEC §4 | warm-up to measure difficulty, hardest tasks first, then DSG |

Options come from `strategy.options` (see `schedule_options`); a task's *stream* is the
train clips whose `label_mask` for that task is 1 (with `data.fine_grained_on_positives`
the fine-grained streams hold the positive clips only).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mtjax.config import ConfigError
from mtjax.data import ClipDataset, DataError, check_batch
from mtjax.data.batching import pad_batch

Step = tuple[list[str], dict[str, Any], np.ndarray]


# ----------------------------------------------------------------------------- option checks

def _opt_error(schedule: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"strategy.options.{key}: {message} (schedule {schedule!r})")


def _int_opt(schedule: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _opt_error(schedule, key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _float_opt(schedule: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise _opt_error(schedule, key, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _finite_or_none(x: float) -> float | None:
    # JSON (the run checkpoint's `run` item) has no portable NaN: store None instead.
    x = float(x)
    return x if math.isfinite(x) else None


def _from_json(x: Any) -> float:
    return float("nan") if x is None else float(x)


def task_streams(dataset: ClipDataset, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Each task's stream: indices of the clips that count for its loss (label_mask == 1)."""
    masks = dataset.arrays["label_mask"]
    return {t: np.flatnonzero(np.asarray(masks[t]) > 0) for t in tasks}


# ----------------------------------------------------------------------------- base

class Schedule:
    """Base = `all_at_once`: all tasks at once over shuffled batches of the whole train split."""

    name = "all_at_once"
    # Whether the next batch depends on the last step's `observe`d losses (then the Trainer
    # waits for every step before drawing the next batch instead of keeping one in flight).
    draws_from_step_losses = False
    # Option name -> default. Options not listed here are refused (or, with an aggregator,
    # routed to it: see `split_strategy_options`).
    DEFAULTS: dict[str, Any] = {}

    def __init__(self, dataset: ClipDataset, tasks: Sequence[str], *, batch_size: int, seed: int,
                 model_config, max_steps_per_epoch: int | None = None, epochs: int | None = None,
                 **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            takes = ", ".join(self.DEFAULTS) or "no options"
            raise ConfigError(f"strategy.options: schedule {self.name!r} does not take {unknown}; "
                              f"it takes: {takes}")
        self.opts = {**self.DEFAULTS, **options}
        self.dataset = dataset
        self.tasks = tuple(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.model_config = model_config
        self.max_steps = max_steps_per_epoch
        self.epochs = epochs  # the run's train.epochs (None when used outside a Trainer)

    # -- batches ------------------------------------------------------------------------

    def _padded(self, idx: np.ndarray, rows: int | None = None) -> tuple[list[str], dict[str, Any]]:
        batch = self.dataset.batch(idx)
        check_batch(batch, self.model_config, require_labels=True, tasks=self.tasks)
        return [self.dataset.clips[i] for i in idx], pad_batch(batch, rows or self.batch_size)

    def _shuffled_batches(self, indices: np.ndarray, epoch: int) -> Iterator[tuple[list[str], dict[str, Any]]]:
        # Data order is a function of (seed, epoch) alone, so a resumed run sees the same order.
        order = np.random.default_rng([self.seed, epoch]).permutation(indices)
        for i, start in enumerate(range(0, len(order), self.batch_size)):
            if self.max_steps is not None and i >= self.max_steps:
                return
            idx = order[start:start + self.batch_size]
            if len(idx) < 2:
                continue  # a 1-clip remainder cannot give BatchNorm statistics (PyTorch errors too)
            yield self._padded(idx)

    def batches(self, epoch: int) -> Iterator[tuple[list[str], dict[str, Any]]]:
        yield from self._shuffled_batches(np.arange(len(self.dataset)), epoch)

    # -- the interface the Trainer drives --------------------------------------------------

    def steps(self, epoch: int) -> Iterator[Step]:
        ones = np.ones(len(self.tasks), np.float32)
        for clips, batch in self.batches(epoch):
            yield clips, batch, ones

    def observe(self, task_mask: np.ndarray, task_losses: np.ndarray) -> None:
        """Called after every step with its (T,) task losses (host values)."""

    def end_epoch(self, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        """Called after each epoch's validation."""

    def sample_weights(self) -> dict[str, float] | None:
        """Per-task sampling weights used for the step just taken (logged in step records),
        or None for schedules that do not sample by task."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class RoundRobin(Schedule):
    """For each batch, one optimizer step per task in turn (T steps per batch). SPEC §4."""

    name = "round_robin"

    def steps(self, epoch: int) -> Iterator[Step]:
        eye = np.eye(len(self.tasks), dtype=np.float32)
        for clips, batch in self.batches(epoch):
            for mask in eye:
                yield clips, batch, mask


# ----------------------------------------------------------------------------- one at a time

class OneAtATime(Schedule):
    """Task after task, each for its own number of epochs (SPEC §4: "easiest first").

    Options:
      order: the tasks in training order; default the config's task order, which is taken
        to be easiest first (the original lists the binary task, then the fine-grained ones).
      epochs_per_task: an int (the same for every task) or {task: int >= 0}. Default: the
        run's `train.epochs` split as evenly as possible, the remainder going to the last
        (hardest) tasks.
    The trainer's epoch counter runs over the whole plan, so `train.epochs` must equal the
    plan's total (a ConfigError says so otherwise). In epoch e the current task trains alone
    (one-hot task_mask) on shuffled batches of its own stream, so no step is spent on clips
    that do not count for it.
    """

    name = "one_at_a_time"
    DEFAULTS = {"order": None, "epochs_per_task": None}

    def __init__(self, dataset, tasks, **kwargs):
        super().__init__(dataset, tasks, **kwargs)
        order = self.opts["order"]
        order = list(self.tasks) if order is None else order
        if (not isinstance(order, (list, tuple)) or sorted(map(str, order)) != sorted(self.tasks)
                or len(order) != len(self.tasks)):
            raise _opt_error(self.name, "order", f"must list each of the model's tasks "
                             f"{list(self.tasks)} exactly once, got {order!r}")
        per = self.opts["epochs_per_task"]
        n_tasks = len(order)
        if per is None:
            if self.epochs is None:
                raise _opt_error(self.name, "epochs_per_task", "is needed when train.epochs is not known")
            if self.epochs < n_tasks:
                raise ConfigError(f"train.epochs={self.epochs} is fewer than the {n_tasks} tasks of schedule "
                                  f"'one_at_a_time'; raise it or give strategy.options.epochs_per_task")
            base, extra = divmod(self.epochs, n_tasks)
            counts = [base + (1 if i >= n_tasks - extra else 0) for i in range(n_tasks)]
        elif isinstance(per, Mapping):
            if sorted(per) != sorted(self.tasks):
                raise _opt_error(self.name, "epochs_per_task", f"as a mapping must have exactly the "
                                 f"model's tasks {list(self.tasks)} as keys, got {sorted(per)}")
            counts = [_int_opt(self.name, f"epochs_per_task.{t}", per[t], 0) for t in order]
        else:
            counts = [_int_opt(self.name, "epochs_per_task", per, 1)] * n_tasks
        total = sum(counts)
        if total < 1:
            raise _opt_error(self.name, "epochs_per_task", "plans no epoch at all")
        self.plan = [(str(t), int(n)) for t, n in zip(order, counts)]
        if self.epochs is not None and self.epochs != total:
            shown = ", ".join(f"{t}: {n}" for t, n in self.plan)
            raise ConfigError(f"schedule 'one_at_a_time' plans {total} epochs ({shown}) but train.epochs is "
                              f"{self.epochs}: set train.epochs={total} or change "
                              f"strategy.options.epochs_per_task")
        self.epoch_tasks = [t for t, n in self.plan for _ in range(n)]
        self.streams = task_streams(dataset, self.tasks)
        for t, _ in self.plan:
            if len(self.streams[t]) < 2:
                raise DataError(f"task {t!r} has {len(self.streams[t])} labelled train clips; schedule "
                                f"'one_at_a_time' needs at least 2 (BatchNorm batch statistics)")

    def task_for_epoch(self, epoch: int) -> str:
        if not 0 <= epoch < len(self.epoch_tasks):
            raise ValueError(f"epoch {epoch} is outside the one_at_a_time plan of {len(self.epoch_tasks)} epochs")
        return self.epoch_tasks[epoch]

    def steps(self, epoch: int) -> Iterator[Step]:
        task = self.task_for_epoch(epoch)
        mask = (np.asarray(self.tasks) == task).astype(np.float32)
        for clips, batch in self._shuffled_batches(self.streams[task], epoch):
            yield clips, batch, mask

    def state_dict(self) -> dict[str, Any]:
        return {"plan": [[t, n] for t, n in self.plan]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [tuple(p) for p in state.get("plan", [])]
        if saved and saved != [tuple(p) for p in self.plan]:
            raise ConfigError(f"resume: the run was planned as {saved}, the config now plans {self.plan}")


# ----------------------------------------------------------------------------- DDS

class DynamicDifficultySampling(Schedule):
    """Dynamic difficulty sampling (SPEC §4; the research code, with its stream bug fixed).

    Each step holds one slice per task: n_t = max(⌈w_t·B⌉, min_per_task) clips drawn from
    task t's own stream (B = data.batch_size). Rows of slice t count for task t only:
    `label_mask[t]` is 1 exactly on slice t's rows, so a clip that is in several streams is
    drawn (and counted) per slice. Every `k` steps the weights become each task's share of
    the recent loss, w_t = mean_k(L_t) / mean_k(Σ_s L_s): harder tasks get more clips.

    Shape: Σ_t n_t ≤ B + min_per_task·T always (⌈w_t·B⌉ < w_t·B + 1 and Σ w_t = 1), so every
    batch is padded to exactly that many rows (`example_mask` 0 on the padding) and the
    compiled step never sees a second shape. With B = 8 and 5 tasks: 18 rows per step.

    Epoch: each stream is shuffled from (seed, epoch, task) and read in order; a stream that
    runs out is reshuffled and continues. The epoch ends after the step in which the last
    stream has been read completely, so every labelled clip of every task is used at least
    once per epoch (the research version stopped at the first exhausted stream, so large
    streams were never fully seen).

    Robustness: losses that are not finite (a skipped step) are ignored; a task with no
    finite loss in a window keeps its weight; a weight of 0 still gets min_per_task clips;
    the weights are renormalised to sum 1 and start uniform.

    Options: k (10), min_per_task (2).
    """

    name = "dynamic_difficulty_sampling"
    DEFAULTS = {"k": 10, "min_per_task": 2}
    draws_from_step_losses = True  # the weights of step i+1 count step i's losses

    def __init__(self, dataset, tasks, **kwargs):
        super().__init__(dataset, tasks, **kwargs)
        self.k = _int_opt(self.name, "k", self.opts["k"], 1)
        self.min_per_task = _int_opt(self.name, "min_per_task", self.opts["min_per_task"], 1)
        self.streams = task_streams(dataset, self.tasks)
        empty = [t for t, s in self.streams.items() if len(s) == 0]
        if empty:
            raise DataError(f"tasks {empty} have no labelled train clip (label_mask == 1): "
                            f"dynamic_difficulty_sampling draws every task's clips from its own stream")
        self.rows = self.batch_size + self.min_per_task * len(self.tasks)
        self.weights = np.full(len(self.tasks), 1.0 / len(self.tasks))
        self._window: list[np.ndarray] = []

    # -- the two formulas (static so tests can check them on hand-made numbers) ----------

    @staticmethod
    def clip_counts(weights: np.ndarray, batch_size: int, minimum: int = 2) -> np.ndarray:
        """n_t = max(⌈w_t·B⌉, minimum) for sanitised weights (non-finite or negative -> 0,
        renormalised; all zero -> uniform)."""
        w = np.asarray(weights, np.float64)
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
        w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
        n = np.maximum(np.ceil(w * batch_size), minimum).astype(np.int64)
        # Cannot trigger in exact arithmetic (see the class doc); guards float round-off.
        bound = batch_size + minimum * len(w)
        while n.sum() > bound:
            n[np.argmax(n)] -= 1
        return n

    @staticmethod
    def difficulty_weights(losses: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """w_t = mean_k(L_t) / mean_k(Σ_s L_s) over a (k, T) window of task losses.

        Non-finite (or negative) entries are ignored per task; tasks with no usable entry
        keep their previous share and the others split the rest in proportion to their
        mean losses. No usable loss at all, or all means 0: the previous weights."""
        L = np.asarray(losses, np.float64)
        prev = np.asarray(previous, np.float64)
        prev = np.where(np.isfinite(prev) & (prev > 0), prev, 0.0)
        prev = prev / prev.sum() if prev.sum() > 0 else np.full(len(prev), 1.0 / len(prev))
        L = np.where(np.isfinite(L) & (L >= 0), L, np.nan)
        usable = np.isfinite(L).any(axis=0)
        if not usable.any():
            return prev
        means = np.array([np.nanmean(L[:, t]) if usable[t] else 0.0 for t in range(L.shape[1])])
        total = means[usable].sum()
        if not total > 0:
            return prev
        w = prev.copy()
        w[usable] = (1.0 - prev[~usable].sum()) * means[usable] / total
        return w / w.sum()

    # -- steps ---------------------------------------------------------------------------

    def steps(self, epoch: int) -> Iterator[Step]:
        n_tasks = len(self.tasks)
        rngs = [np.random.default_rng([self.seed, epoch, i]) for i in range(n_tasks)]
        perms = [rng.permutation(self.streams[t]) for rng, t in zip(rngs, self.tasks)]
        pos = [0] * n_tasks
        seen_all = [False] * n_tasks
        ones = np.ones(n_tasks, np.float32)
        step = 0
        while not all(seen_all):
            if self.max_steps is not None and step >= self.max_steps:
                return
            counts = self.clip_counts(self.weights, self.batch_size, self.min_per_task)
            rows, owner = [], []
            for i, n in enumerate(counts):
                need = int(n)
                while need > 0:
                    take = perms[i][pos[i]:pos[i] + need]
                    rows.extend(take)
                    owner.extend([i] * len(take))
                    pos[i] += len(take)
                    need -= len(take)
                    if pos[i] == len(perms[i]):  # the stream has been read to its end
                        seen_all[i] = True
                        perms[i] = rngs[i].permutation(self.streams[self.tasks[i]])
                        pos[i] = 0
            idx = np.asarray(rows, np.int64)
            owner = np.asarray(owner)
            clips, batch = self._padded(idx, self.rows)
            real = len(idx)
            for i, t in enumerate(self.tasks):
                # Slice t's rows count for task t only (a clip of two streams is in two slices).
                m = np.zeros(self.rows, np.float32)
                m[:real] = (owner == i).astype(np.float32) * batch["label_mask"][t][:real]
                batch["label_mask"][t] = m
            step += 1
            yield clips, batch, ones

    def observe(self, task_mask: np.ndarray, task_losses: np.ndarray) -> None:
        self._window.append(np.asarray(task_losses, np.float64).reshape(-1).copy())
        if len(self._window) >= self.k:
            self.weights = self.difficulty_weights(np.stack(self._window), self.weights)
            self._window = []

    def sample_weights(self) -> dict[str, float]:
        return {t: float(w) for t, w in zip(self.tasks, self.weights)}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights],
                "window": [[_finite_or_none(x) for x in row] for row in self._window]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "weights" in state:
            self.weights = np.asarray(state["weights"], np.float64)
        self._window = [np.asarray([_from_json(x) for x in row], np.float64) for row in state.get("window", [])]


# ----------------------------------------------------------------------------- DSG

class DynamicStopAndGo(Schedule):
    """Dynamic stop-and-go (Lu et al. 2020, "12-in-1: Multi-Task Vision and Language
    Representation Learning", §4; SPEC §4).

    Every task starts in "go" and trains on every batch of the whole split. After each
    validation, with m = the task's validation metric (option `metric`, default its binary
    F1 `val["per_task"][task]["f1"]`):
    - a go task stops when the best of its last `window` (2) evaluations improves on the
      best evaluation before them by less than `stop_threshold` (0.1%);
    - a stopped task goes again when m falls more than `go_threshold` (0.5%) below its best
      evaluation so far; its stop test then starts afresh from that evaluation, so it
      needs `window` more evaluations before it can stop again.
    A falling metric is also "< 0.1% improvement"; a go task that is already more than
    `go_threshold` below its best therefore stays in go (the two rules would otherwise stop
    it and restart it at the next evaluation, losing an epoch of a diverging task): only a
    task on a plateau near its best stops.
    `threshold_mode` 'rel' (default, as 12-in-1's released controller) measures both in
    units of the reference value (the best before / the best so far); 'abs' in metric
    units (F1 0.001 = 0.1 point). So a task can first stop after window + 1 evaluations.

    Steps: task_mask = go tasks on every step, plus stopped tasks on steps where
    counter % iter_gap == 0 (counter = batches since the start of the run). A batch whose
    mask would be all zero (every task stopped, off-gap) is not yielded: it would only move
    the parameters through the optimizer's momentum.
    """

    name = "dsg"
    DEFAULTS = {"iter_gap": 4, "window": 2, "stop_threshold": 0.001, "go_threshold": 0.005,
                "threshold_mode": "rel", "metric": "f1"}

    def __init__(self, dataset, tasks, **kwargs):
        super().__init__(dataset, tasks, **kwargs)
        self._check_dsg_options()
        n_tasks = len(self.tasks)
        self.stopped = np.zeros(n_tasks, bool)
        self.history: list[list[float]] = [[] for _ in range(n_tasks)]  # since the task last went
        self.best = [float("-inf")] * n_tasks
        self.counter = 0
        self.transitions: list[dict[str, Any]] = []

    def _check_dsg_options(self) -> None:
        o = self.opts
        self.iter_gap = _int_opt(self.name, "iter_gap", o["iter_gap"], 1)
        self.window = _int_opt(self.name, "window", o["window"], 1)
        self.stop_threshold = _float_opt(self.name, "stop_threshold", o["stop_threshold"])
        self.go_threshold = _float_opt(self.name, "go_threshold", o["go_threshold"])
        if o["threshold_mode"] not in ("rel", "abs"):
            raise _opt_error(self.name, "threshold_mode", f"must be 'rel' or 'abs', got {o['threshold_mode']!r}")
        self.threshold_mode = o["threshold_mode"]
        if o["metric"] not in ("f1", "accuracy", "macro_f1", "weighted_f1"):
            raise _opt_error(self.name, "metric", f"must be a per-task validation metric: f1, accuracy, "
                             f"macro_f1 or weighted_f1; got {o['metric']!r}")
        self.metric = o["metric"]

    def _scale(self, reference: float) -> float:
        return max(abs(reference), 1e-12) if self.threshold_mode == "rel" else 1.0

    def plateaued(self, history: Sequence[float]) -> bool:
        """< stop_threshold improvement of the last `window` evaluations over those before."""
        if len(history) <= self.window:
            return False
        before = max(history[:-self.window])
        recent = max(history[-self.window:])
        return recent - before < self.stop_threshold * self._scale(before)

    def diverged(self, value: float, best: float) -> bool:
        """More than go_threshold below the best so far."""
        return best - value > self.go_threshold * self._scale(best)

    def task_mask(self) -> np.ndarray:
        """The mask of the next step (does not advance the counter)."""
        on_gap = self.counter % self.iter_gap == 0
        return (~self.stopped | on_gap).astype(np.float32)

    def steps(self, epoch: int) -> Iterator[Step]:
        for clips, batch in self.batches(epoch):
            mask = self.task_mask()
            self.counter += 1
            if mask.any():
                yield clips, batch, mask

    def _task_value(self, val_metrics: Mapping[str, Any], task: str) -> float:
        try:
            return float(val_metrics["per_task"][task][self.metric])
        except (KeyError, TypeError) as e:
            raise KeyError(f"dsg: validation metrics lack per_task[{task!r}][{self.metric!r}]") from e

    def seed_history(self, val_metrics: Mapping[str, Any]) -> None:
        """Record an evaluation as the starting point, without any transition (curriculum)."""
        for i, t in enumerate(self.tasks):
            m = self._task_value(val_metrics, t)
            if math.isfinite(m):
                self.history[i] = [m]
                self.best[i] = max(self.best[i], m)

    def end_epoch(self, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        for i, t in enumerate(self.tasks):
            m = self._task_value(val_metrics, t)
            if not math.isfinite(m):
                continue  # no evidence either way
            self.best[i] = max(self.best[i], m)
            self.history[i].append(m)
            if self.stopped[i] and self.diverged(m, self.best[i]):
                self.stopped[i] = False
                self.history[i] = [m]
                self.transitions.append({"epoch": epoch, "task": t, "to": "go", "value": m})
                print(f"dsg: epoch {epoch}: {t} goes again ({self.metric} {m:.4f}, best {self.best[i]:.4f})")
            elif (not self.stopped[i] and self.plateaued(self.history[i])
                  and not self.diverged(m, self.best[i])):
                self.stopped[i] = True
                self.transitions.append({"epoch": epoch, "task": t, "to": "stop", "value": m})
                print(f"dsg: epoch {epoch}: {t} stops ({self.metric} {m:.4f}; updated every {self.iter_gap} steps)")

    def status(self) -> dict[str, str]:
        return {t: ("stop" if s else "go") for t, s in zip(self.tasks, self.stopped)}

    def state_dict(self) -> dict[str, Any]:
        return {"stopped": [bool(s) for s in self.stopped],
                "history": [[float(x) for x in h] for h in self.history],
                "best": [_finite_or_none(b) for b in self.best],
                "counter": int(self.counter), "transitions": list(self.transitions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.stopped = np.asarray(state["stopped"], bool)
        self.history = [[float(x) for x in h] for h in state["history"]]
        self.best = [float("-inf") if b is None else float(b) for b in state["best"]]
        self.counter = int(state["counter"])
        self.transitions = list(state.get("transitions", []))


# ----------------------------------------------------------------------------- curriculum

class Curriculum(Schedule):
    """Curriculum (SPEC §4): rank tasks by difficulty, train the hard ones first, then all
    tasks with DSG.

    Phases (epochs counted over the whole run):
    1. warm-up, `warmup_epochs` (1): all_at_once, recording every step's task losses.
    2. hard, `hard_epochs` (1): only the `num_hard` hardest tasks (default ⌊T/2⌋, at least
       1), together, on batches of the whole split.
    3. the remaining epochs: all tasks with DSG (`dsg`'s options apply), its stop test
       starting from the validation at the end of phase 2 (earlier evaluations are left
       out: the easy tasks did not train in phase 2, so their flat curve there is no sign
       of convergence).
    Difficulty = convergence speed in the warm-up: with L_t the warm-up's per-step training
    losses of task t (non-finite ones ignored) and q = max(1, ⌈head_fraction·S⌉) of its S
    steps (head_fraction 0.2), r_t = 1 − mean(last q L_t) / mean(first q L_t), the relative
    loss decrease. The slower (smaller r_t) the harder; ties keep the config order. A task
    whose first losses are already 0 counts as converged (r_t = 1); one with no finite loss
    as never converging (r_t = −inf, hardest). `train.epochs` must exceed
    warmup_epochs + hard_epochs.
    """

    name = "curriculum"
    DEFAULTS = {"warmup_epochs": 1, "hard_epochs": 1, "num_hard": None, "head_fraction": 0.2,
                **DynamicStopAndGo.DEFAULTS}

    def __init__(self, dataset, tasks, **kwargs):
        super().__init__(dataset, tasks, **kwargs)
        o = self.opts
        self.warmup_epochs = _int_opt(self.name, "warmup_epochs", o["warmup_epochs"], 1)
        self.hard_epochs = _int_opt(self.name, "hard_epochs", o["hard_epochs"], 1)
        n_tasks = len(self.tasks)
        num_hard = max(1, n_tasks // 2) if o["num_hard"] is None else o["num_hard"]
        self.num_hard = _int_opt(self.name, "num_hard", num_hard, 1)
        if self.num_hard > n_tasks:
            raise _opt_error(self.name, "num_hard", f"is {self.num_hard} but the model has {n_tasks} tasks")
        self.head_fraction = _float_opt(self.name, "head_fraction", o["head_fraction"])
        if not 0 < self.head_fraction <= 0.5:
            raise _opt_error(self.name, "head_fraction", f"must be in (0, 0.5], got {self.head_fraction}")
        pre = self.warmup_epochs + self.hard_epochs
        if self.epochs is not None and self.epochs <= pre:
            raise ConfigError(f"schedule 'curriculum' needs train.epochs > warmup_epochs + hard_epochs = {pre} "
                              f"(so that the DSG phase has an epoch); train.epochs is {self.epochs}")
        framework = {k: v for k, v in kwargs.items() if k not in self.DEFAULTS}
        dsg_opts = {k: o[k] for k in DynamicStopAndGo.DEFAULTS}
        self.dsg = DynamicStopAndGo(dataset, tasks, **{**framework, "epochs": None}, **dsg_opts)
        self.warmup_losses: list[np.ndarray] = []
        self.ranking: list[str] | None = None  # hardest first
        self._phase = "warmup"

    def phase(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        return "hard" if epoch < self.warmup_epochs + self.hard_epochs else "dsg"

    @staticmethod
    def convergence_rates(losses: np.ndarray, head_fraction: float = 0.2) -> np.ndarray:
        """r_t = 1 − mean(last q losses) / mean(first q losses) per task of an (S, T) history."""
        L = np.asarray(losses, np.float64)
        if L.ndim != 2 or L.shape[0] == 0:
            raise ValueError(f"need an (S >= 1, T) loss history, got shape {L.shape}")
        rates = np.empty(L.shape[1])
        for t in range(L.shape[1]):
            x = L[:, t][np.isfinite(L[:, t])]
            if x.size == 0:
                rates[t] = -np.inf
                continue
            q = max(1, math.ceil(head_fraction * x.size))
            first, last = x[:q].mean(), x[-q:].mean()
            rates[t] = 1.0 if first <= 0 else 1.0 - last / first
        return rates

    def rank(self, losses: np.ndarray) -> list[str]:
        """Tasks hardest (slowest loss decrease) first."""
        rates = self.convergence_rates(losses, self.head_fraction)
        return [self.tasks[i] for i in np.argsort(rates, kind="stable")]

    @property
    def hard_tasks(self) -> list[str]:
        if self.ranking is None:
            raise RuntimeError("curriculum: the difficulty ranking is not known before the warm-up ends")
        return self.ranking[:self.num_hard]

    def steps(self, epoch: int) -> Iterator[Step]:
        self._phase = self.phase(epoch)
        if self._phase == "warmup":
            yield from super().steps(epoch)
        elif self._phase == "hard":
            mask = np.isin(np.asarray(self.tasks), self.hard_tasks).astype(np.float32)
            for clips, batch in self.batches(epoch):
                yield clips, batch, mask
        else:
            yield from self.dsg.steps(epoch)

    def observe(self, task_mask: np.ndarray, task_losses: np.ndarray) -> None:
        if self._phase == "warmup":
            self.warmup_losses.append(np.asarray(task_losses, np.float64).reshape(-1).copy())

    def end_epoch(self, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        phase = self.phase(epoch)
        if phase == "warmup" and epoch == self.warmup_epochs - 1:
            if not self.warmup_losses:
                warnings.warn("curriculum: the warm-up took no step; keeping the config order as difficulty")
                self.ranking = list(self.tasks)
            else:
                self.ranking = self.rank(np.stack(self.warmup_losses))
            print(f"curriculum: difficulty (hardest first) {self.ranking}; hard phase trains {self.hard_tasks}")
        if phase == "hard" and epoch == self.warmup_epochs + self.hard_epochs - 1:
            self.dsg.seed_history(val_metrics)
        elif phase == "dsg":
            self.dsg.end_epoch(epoch, val_metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_losses": [[_finite_or_none(x) for x in row] for row in self.warmup_losses],
                "ranking": self.ranking, "dsg": self.dsg.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.warmup_losses = [np.asarray([_from_json(x) for x in row], np.float64)
                              for row in state.get("warmup_losses", [])]
        self.ranking = list(state["ranking"]) if state.get("ranking") is not None else None
        self.dsg.load_state_dict(state.get("dsg", {}))


# ----------------------------------------------------------------------------- registry

SCHEDULES: dict[str, type[Schedule]] = {
    "all_at_once": Schedule,
    "round_robin": RoundRobin,
    "one_at_a_time": OneAtATime,
    "dynamic_difficulty_sampling": DynamicDifficultySampling,
    "dsg": DynamicStopAndGo,
    "curriculum": Curriculum,
}


def _schedule_class(name: str) -> type[Schedule]:
    if name not in SCHEDULES:
        raise ConfigError(f"strategy.schedule: {name!r} is not available (available: {', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def schedule_options(name: str) -> dict[str, Any]:
    """The options (with defaults) that schedule `name` takes from strategy.options."""
    return dict(_schedule_class(name).DEFAULTS)


def split_strategy_options(schedule: str, options: Mapping[str, Any], *,
                           has_aggregator: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """strategy.options -> (schedule options, aggregator options).

    The schedule takes the keys it declares; the rest belong to the aggregator. Without an
    aggregator a key the schedule does not take is an error naming what it takes."""
    mine = set(_schedule_class(schedule).DEFAULTS)
    sched = {k: v for k, v in options.items() if k in mine}
    rest = {k: v for k, v in options.items() if k not in mine}
    if rest and not has_aggregator:
        takes = ", ".join(sorted(mine)) or "no options"
        raise ConfigError(f"strategy.options: {sorted(rest)} are not options of schedule {schedule!r} "
                          f"(it takes: {takes}) and no strategy.aggregator is set to take them")
    return sched, rest


def make_schedule(name: str, dataset: ClipDataset, tasks: Sequence[str], **kwargs) -> Schedule:
    return _schedule_class(name)(dataset, tasks, **kwargs)

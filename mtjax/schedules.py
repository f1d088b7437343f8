"""Task schedules: which clips and which tasks make each train step (SPEC §4).

A schedule turns an epoch of the train split into steps `(clips, batch, task_mask)`.
Batches are padded to the configured batch size and `task_mask` (T,) selects the tasks
whose losses count, so every step has one shape and the compiled step never recompiles.
Schedules see the per-step task losses (`observe`) and each epoch's validation metrics
(`end_epoch`); their state is host-side and derived from (seed, epoch) where possible.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mtjax.config import ConfigError
from mtjax.data import ClipDataset, check_batch
from mtjax.data.batching import pad_batch

Step = tuple[list[str], dict[str, Any], np.ndarray]


class Schedule:
    """Base: all tasks at once over shuffled batches of the whole train split."""

    name = "all_at_once"

    def __init__(self, dataset: ClipDataset, tasks: Sequence[str], *, batch_size: int, seed: int,
                 model_config, max_steps_per_epoch: int | None = None, **options):
        if options:
            raise ConfigError(f"strategy.options: schedule {self.name!r} takes no options {sorted(options)}")
        self.dataset = dataset
        self.tasks = tuple(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.model_config = model_config
        self.max_steps = max_steps_per_epoch

    def batches(self, epoch: int) -> Iterator[tuple[list[str], dict[str, Any]]]:
        # Data order is a function of (seed, epoch) alone, so a resumed run sees the same order.
        rng = np.random.default_rng([self.seed, epoch])
        for i, (clips, batch) in enumerate(self.dataset.iter_batches(self.batch_size, shuffle=True, seed=rng)):
            if self.max_steps is not None and i >= self.max_steps:
                return
            check_batch(batch, self.model_config, require_labels=True, tasks=self.tasks)
            if len(clips) < 2:
                continue  # a 1-clip remainder cannot give BatchNorm statistics (PyTorch errors too)
            yield clips, pad_batch(batch, self.batch_size)

    def steps(self, epoch: int) -> Iterator[Step]:
        ones = np.ones(len(self.tasks), np.float32)
        for clips, batch in self.batches(epoch):
            yield clips, batch, ones

    def observe(self, task_mask: np.ndarray, task_losses: np.ndarray) -> None:
        """Called after every step with its (T,) task losses (host values)."""

    def end_epoch(self, epoch: int, val_metrics: Mapping[str, Any]) -> None:
        """Called after each epoch's validation."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class RoundRobin(Schedule):
    """For each batch, one optimizer step per task in turn (T steps per batch)."""

    name = "round_robin"

    def steps(self, epoch: int) -> Iterator[Step]:
        eye = np.eye(len(self.tasks), dtype=np.float32)
        for clips, batch in self.batches(epoch):
            for mask in eye:
                yield clips, batch, mask


SCHEDULES: dict[str, type[Schedule]] = {"all_at_once": Schedule, "round_robin": RoundRobin}


def make_schedule(name: str, dataset: ClipDataset, tasks: Sequence[str], **kwargs) -> Schedule:
    if name not in SCHEDULES:
        raise ConfigError(f"strategy.schedule: {name!r} is not available (available: {', '.join(SCHEDULES)})")
    return SCHEDULES[name](dataset, tasks, **kwargs)

"""Fixed-shape batches: pad a short batch so every step reuses one compiled program."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def pad_batch(batch: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """Pads every array along axis 0 to `batch_size` with zeros and adds `example_mask`
    (1 on real rows). Padded rows have zero label masks, so they count in no loss or
    metric, and the heads' BatchNorm leaves them out of its training statistics."""
    n = len(batch["text"])
    if n > batch_size:
        raise ValueError(f"batch has {n} rows, more than batch_size={batch_size}")

    def pad(x):
        if isinstance(x, Mapping):
            return {k: pad(v) for k, v in x.items()}
        x = np.asarray(x)
        widths = [(0, batch_size - n)] + [(0, 0)] * (x.ndim - 1)
        return np.pad(x, widths)

    out = pad({k: v for k, v in batch.items() if k != "example_mask"})
    mask = np.asarray(batch.get("example_mask", np.ones(n, np.float32)), np.float32)
    out["example_mask"] = np.pad(mask, (0, batch_size - n))
    return out

"""Data: the original HICCAP on-disk layout -> padded numpy batches, plus a synthetic generator."""

from mtjax.data.reader import (
    ClipDataset,
    DataError,
    DataWarning,
    check_batch,
    load_split,
    split_paths,
)

__all__ = ["ClipDataset", "DataError", "DataWarning", "check_batch", "load_split", "split_paths",
           "make_synthetic_dataset"]


def __getattr__(name):
    # Lazy: synth pulls in the tokenizer, which the reader never needs.
    if name == "make_synthetic_dataset":
        from mtjax.data.synth import make_synthetic_dataset
        return make_synthetic_dataset
    raise AttributeError(f"module 'mtjax.data' has no attribute {name!r}")

"""Flax modules of HICCAP. Parameters are plain pytrees named after the PyTorch modules."""

from mtjax.models.hiccap import HICCAP, init_variables

__all__ = ["HICCAP", "init_variables"]

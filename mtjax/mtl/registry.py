"""Config name -> constructor, for gradient aggregators and loss weightings.

``AGGREGATORS[name](**opts)`` returns an ``optax.GradientTransformation`` (every
constructor accepts ``num_tasks=``; GradVac requires it). ``WEIGHTINGS[name](**opts)``
returns a ``weightings.Weighting``. ``make_aggregator`` / ``make_weighting`` do the
same with an error that lists the known names (and the accepted options).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from mtjax.mtl import aggregators as agg
from mtjax.mtl import weightings as wt

AGGREGATORS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sum": agg.sum_tasks,
    "mean": agg.mean_tasks,
    "pcgrad": agg.pcgrad,
    "mgda": agg.mgda,
    "cagrad": agg.cagrad,
    "imtl_g": agg.imtl_g,
    "gradvac": agg.gradvac,
    "aligned_mtl": agg.aligned_mtl,
    "nash_mtl": agg.nash_mtl,
    "upgrad": agg.upgrad,
    "graddrop": agg.graddrop,
}

WEIGHTINGS: dict[str, Callable[..., wt.Weighting]] = {
    "unweighted": wt.unweighted,
    "predefined": wt.predefined,
    "naive_learnable": wt.naive_learnable,
    "uncertainty": wt.uncertainty,
    "gradnorm": wt.gradnorm,
    "dwa": wt.dwa,
    "rlw": wt.rlw,
    "famo": wt.famo,
}


def _lookup(kind: str, table: dict[str, Callable[..., Any]], name: str) -> Callable[..., Any]:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(table))}")
    return table[name]


def _call(kind: str, name: str, ctor: Callable[..., Any], opts: dict[str, Any]) -> Any:
    params = inspect.signature(ctor).parameters
    unknown = sorted(k for k in opts if k not in params)
    if unknown:
        raise TypeError(f"{kind} {name!r} does not take option(s) {unknown}; it takes: "
                        f"{', '.join(params) or 'no options'}")
    return ctor(**opts)


def make_aggregator(name: str, **opts) -> optax.GradientTransformation:
    """``AGGREGATORS[name](**opts)`` with readable errors."""
    return _call("aggregator", name, _lookup("aggregator", AGGREGATORS, name), opts)


def make_weighting(name: str, **opts) -> wt.Weighting:
    """``WEIGHTINGS[name](**opts)`` with readable errors."""
    return _call("weighting", name, _lookup("weighting", WEIGHTINGS, name), opts)

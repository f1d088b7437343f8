"""Multi-task learning strategies, pure JAX and independent of the model.

* ``aggregators``: per-task gradients -> one update, as optax ``GradientTransformation``s
  (sum, mean, PCGrad, MGDA, CAGrad, IMTL-G, GradVac, Aligned-MTL, Nash-MTL, UPGrad,
  GradDrop) plus their pure Gram-matrix solvers and ``aggregate_fn`` on (T, P) matrices.
* ``weightings``: loss weightings behind one ``Weighting`` interface (unweighted,
  predefined, naive learnable, uncertainty, GradNorm, DWA, RLW, FAMO).
* ``registry``: config names -> constructors.
"""

from mtjax.mtl.aggregators import MatrixAggregator, aggregate_fn
from mtjax.mtl.registry import AGGREGATORS, WEIGHTINGS, make_aggregator, make_weighting
from mtjax.mtl.weightings import Weighting

__all__ = [
    "AGGREGATORS", "WEIGHTINGS", "make_aggregator", "make_weighting", "aggregate_fn",
    "MatrixAggregator", "Weighting",
]

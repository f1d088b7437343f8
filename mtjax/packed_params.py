"""The optimizer step over small parameter arrays packed into one flat vector.

HICCAP has 318 parameter arrays; 218 of them (biases, LayerNorm and BatchNorm parameters,
pooling vectors, the heads' small kernels) hold at most 8,000 numbers each, 228,024 in all. Per array, the step
after the gradients is a sum of squares (the finiteness check and the norm), the Adam
update and the skip select: on a GPU each is a kernel of its own that is over in a couple
of microseconds, so those arrays cost launches, not bandwidth. Packed (`pack`), the small
arrays are one vector: one sum, one update and one select, and `unpack` hands each array
back as a slice of the result.

The update is elementwise, so packing changes no parameter value (only the order in which
the gradient norm sums its squares). The optimizer's state is kept packed too, so it is a
different tree: a run's checkpoints resume under the setting they were written with
(`optim.pack_small_arrays`, saved with the run's experiment).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Arrays of at most this many elements are packed. HICCAP's hold either at most 8,000
# numbers or over 200,000, so any bound between gives the same split (16,384 and 262,144
# timed the same on an H100).
SMALL_ARRAY_MAX = 65536


class Packed(NamedTuple):
    large: tuple        # the other leaves, in tree order
    small: jax.Array    # the small float32 leaves, flattened and concatenated in tree order


def _is_small(leaf) -> bool:
    return leaf.size <= SMALL_ARRAY_MAX and leaf.dtype == jnp.float32


def pack(tree: Any) -> Packed:
    """The tree's small float32 leaves as one vector; the other leaves as they are."""
    leaves = jax.tree_util.tree_leaves(tree)
    small = [leaf.ravel() for leaf in leaves if _is_small(leaf)]
    return Packed(large=tuple(leaf for leaf in leaves if not _is_small(leaf)),
                  small=jnp.concatenate(small) if small else jnp.zeros((0,), jnp.float32))


def unpack(packed: Packed, like: Any) -> Any:
    """`pack`'s inverse: a tree of `like`'s structure (arrays or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    large, out, offset = iter(packed.large), [], 0
    for leaf in leaves:
        if _is_small(leaf):
            out.append(packed.small[offset:offset + leaf.size].reshape(leaf.shape))
            offset += leaf.size
        else:
            out.append(next(large))
    return jax.tree_util.tree_unflatten(treedef, out)

"""Model arguments split into dynamic arrays and a static, hashable signature.

Both the tracer (its one compiled probe of the model) and the driver (its compiled
per-iteration steps) compile functions of the model's arguments. Passing the array
leaves as jit arguments and keying a cache on everything else lets a second run on new
data of the same shapes reuse the compiled code, and keeps large data out of the
compiled program's constants.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

__all__ = ["split_model_args", "with_model_args"]


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def split_model_args(args: tuple, kwargs: dict):
    """Splits model arguments into dynamic array leaves and a hashable static signature.

    Returns ``(data, signature, rebuild)``: ``rebuild(data)`` gives back ``(args, kwargs)``
    with the given arrays in place; ``signature`` is None when a static leaf is not
    hashable (then nothing is cached).
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = tuple(_is_array(leaf) for leaf in leaves)
    data = tuple(leaf for leaf, d in zip(leaves, dynamic, strict=True) if d)
    static = tuple(None if d else leaf for leaf, d in zip(leaves, dynamic, strict=True))
    signature = (treedef, dynamic, static)
    try:
        hash(signature)
    except TypeError:
        signature = None

    def rebuild(values):
        it = iter(values)
        full = [next(it) if d else leaf for leaf, d in zip(static, dynamic, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, full)

    return data, signature, rebuild


def with_model_args(problem, rebuild, data):
    """``problem`` (a traced :class:`~eki_infer.tracing.InverseProblem`) with its model
    arguments replaced by ``rebuild(data)``: inside a jitted function, the same problem
    structure evaluated on the traced data."""
    args, kwargs = rebuild(data)
    return dataclasses.replace(problem, model_args=args, model_kwargs=kwargs)

"""Model arguments split into dynamic arrays and a static, hashable signature.

Both the tracer (its one compiled probe of the model) and the driver (its compiled
per-iteration steps) compile functions of the model's arguments. Passing the array
leaves as jit arguments and keying a cache on everything else lets a second run on new
data of the same shapes reuse the compiled code, and keeps large data out of the
compiled program's constants.

What a model reads from outside its arguments (module globals, closure cells) is baked
into the compiled code as constants instead, so the caches also key on
:func:`model_fingerprint`, a digest of those values: a script that changes a global
array and runs again gets code compiled for the new values, not the old ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types

import jax
import numpy as np

__all__ = ["digest_leaves", "model_fingerprint", "split_model_args", "with_model_args"]

_SCALARS = (bool, int, float, complex, str, bytes, np.generic)
# libraries whose functions a model calls but whose module state is not the model's data
_LIBRARIES = ("numpyro", "jax", "jaxlib", "numpy", "scipy", "eki_infer")


def digest_leaves(leaves) -> str:
    """SHA-256 of a sequence of values: each array by its dtype, shape and bytes; a
    value that is not numeric (a function, say) by its repr."""
    digest = hashlib.sha256()
    for leaf in leaves:
        try:
            array = np.asarray(leaf)
        except Exception:
            array = None
        if array is None or array.dtype == object:
            digest.update(repr(leaf).encode())
            continue
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def model_fingerprint(model, depth: int = 4) -> tuple:
    """A hashable digest of the values ``model`` reads from module globals and closure
    cells: numbers, strings, arrays (by :func:`digest_leaves`) and
    short tuples or lists of them, found by following the functions it refers to (and
    ``functools.partial`` objects, bound methods and callable objects such as NumPyro's
    handlers around a model, whose attributes are read) up to ``depth`` levels deep.
    Modules, classes, non-callable objects and the functions of NumPyro, JAX, NumPy,
    SciPy and eki_infer are not looked into; a model that reads data from one of those
    (an attribute of a module, say) should take it as an argument instead."""
    items: list = []
    seen: set = set()

    def digest(value):
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, np.ndarray | jax.Array):
            return digest_leaves([value])
        if isinstance(value, tuple | list) and len(value) <= 64:
            parts = [digest(v) for v in value]
            return None if any(p is None for p in parts) else tuple(parts)
        if isinstance(value, dict) and len(value) <= 64:
            parts = [(str(k), digest(v)) for k, v in sorted(value.items(), key=str)]
            return None if any(p is None for _, p in parts) else tuple(parts)
        return None

    def visit(label, value, level):
        if isinstance(value, functools.partial):
            visit(label, value.func, level)
            for i, arg in enumerate((*value.args, *value.keywords.values())):
                visit(f"{label}.<arg {i}>", arg, level)
        elif isinstance(value, types.FunctionType):
            visit_function(value, level - 1)
        elif isinstance(value, types.MethodType):
            visit(label, value.__func__, level)
            visit_object(label, value.__self__, level)
        else:
            d = digest(value)
            if d is not None:
                items.append((label, d))
            elif callable(value) and not isinstance(value, type):
                # a callable object: a NumPyro handler around the model (substitute,
                # condition, seed, ...) or a class with __call__
                visit_object(label, value, level)

    def visit_object(label, obj, level):
        if level < 0 or id(obj) in seen or not hasattr(obj, "__dict__"):
            return
        seen.add(id(obj))
        call = inspect.getattr_static(type(obj), "__call__", None)
        if isinstance(call, types.FunctionType):
            visit_function(call, level - 1)
        for name, attribute in sorted(vars(obj).items()):
            visit(f"{label}.{name}", attribute, level - 1)

    def names_in(code):
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= names_in(const)
        return names

    def visit_function(fn, level):
        if level < 0 or id(fn) in seen:
            return
        if (fn.__module__ or "").split(".")[0] in _LIBRARIES:
            return
        seen.add(id(fn))
        code, scope = fn.__code__, fn.__globals__
        where = f"{fn.__module__}.{fn.__qualname__}"
        for name in sorted(names_in(code)):
            if name in scope:
                visit(f"{fn.__module__}.{name}", scope[name], level)
        for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            visit(f"{where}.<{name}>", value, level)

    visit("model", model, depth + 1)
    return tuple(items)


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

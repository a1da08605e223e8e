"""Black-box simulators inside NumPyro models.

:func:`black_box` wraps an ordinary Python/NumPy function (a wrapper around a Fortran
climate component, a C++ PDE solver, a legacy simulator) so that it can be called inside
a NumPyro model like a JAX function::

    @black_box(output_shape=(20,))
    def simulate(beta, gamma):           # plain NumPy, one parameter set
        return legacy_sir_solver(beta, gamma)

    def model(y=None):
        beta = numpyro.sample("beta", dist.LogNormal(-0.7, 0.5))
        gamma = numpyro.sample("gamma", dist.Gamma(8.0, 40.0))
        numpyro.sample("y", dist.Normal(simulate(beta, gamma), 0.01).to_event(1), obs=y)

How it runs: the call becomes a ``jax.pure_callback`` with ``vmap_method="broadcast_all"``,
so when EKIInference evaluates the ensemble (``vmap`` over members and chains) the host
side receives the *whole batch at once* and hands it to the active executor (serial,
threads, processes or Dask; see :mod:`eki_infer.executors`), which maps the simulator
over the members and marks failed ones (exception, timeout, wrong shape, NaN/inf) with
NaN rows. Gradients do not exist: NUTS, HMC or SVI on the same model raise
:class:`BlackBoxGradientError` at their first gradient, instead of silently using a
wrong one.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from eki_infer.executors import active_executor

__all__ = ["BlackBoxGradientError", "black_box"]


class BlackBoxGradientError(TypeError):
    """Raised when a gradient of a black-box simulator is requested."""


def black_box(fn=None, *, output_shape, dtype=None, name: str | None = None):
    """Wraps a NumPy simulator ``fn(*args) -> array of output_shape`` for NumPyro models.

    Args:
        fn: the simulator; it receives NumPy arrays (one member's arguments) and returns
            an array-like of ``output_shape``. May raise, return NaN or hang: such
            members fail and are handled by the ensemble method's failure policy.
        output_shape: the shape of one simulator output.
        dtype: a floating output dtype (default: JAX's default float, float64 under
            x64).
        name: name used in error messages (default: the function's name).

    Usable as ``black_box(fn, output_shape=...)`` or as a decorator
    ``@black_box(output_shape=...)``.
    """
    if fn is None:
        return functools.partial(black_box, output_shape=output_shape, dtype=dtype, name=name)
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(
            f"black_box dtype must be a floating-point dtype, got {jnp.dtype(dtype)}: a "
            "failed member's output is a row of NaN, which an integer or complex dtype "
            "cannot hold."
        )
    shape = tuple(int(s) for s in np.atleast_1d(output_shape)) if output_shape != () else ()
    label = name or getattr(fn, "__name__", "simulator")

    def host(core_ndims, out_dtype, *args):
        """Runs on the host with NumPy arrays whose leading axes are the batch."""
        args = [np.asarray(a) for a in args]
        batch_shape = args[0].shape[: args[0].ndim - core_ndims[0]] if args else ()
        n = math.prod(batch_shape)
        flat = [
            a.reshape((n, *a.shape[a.ndim - k :])) for a, k in zip(args, core_ndims, strict=True)
        ]
        members = [tuple(a[i] for a in flat) for i in range(n)]
        outputs, _ = active_executor().map(fn, members, shape, out_dtype)
        return outputs.reshape((*batch_shape, *shape))

    @jax.custom_jvp
    def call(*args):
        args = [jnp.asarray(a) for a in args]
        out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
        core_ndims = tuple(a.ndim for a in args)
        result = jax.ShapeDtypeStruct(shape, out_dtype)
        return jax.pure_callback(
            functools.partial(host, core_ndims, out_dtype),
            result,
            *args,
            vmap_method="broadcast_all",
        )

    @call.defjvp
    def call_jvp(primals, tangents):
        raise BlackBoxGradientError(
            f"black-box simulator '{label}' has no derivatives: gradient-based inference "
            "(NUTS, HMC, SVI, Laplace) cannot be used on this model. Use "
            "eki_infer.EKIInference, which needs only forward evaluations."
        )

    functools.update_wrapper(call, fn)
    return call

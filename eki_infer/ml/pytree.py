"""Training a plain function ``f(params, x)`` over a parameter PyTree with EKI.

Any PyTree of arrays works — nested dicts and lists, Equinox module parameters
(``eqx.partition(model, eqx.is_array)``), Flax ``params`` dicts — because the parameters
are flattened once with :func:`jax.flatten_util.ravel_pytree` into a vector of length d,
and every ensemble member is such a vector. The network is only ever *evaluated*
(``jax.vmap`` of ``f`` over the members); it is never differentiated.

The initial ensemble and the re-spreading distribution are μ0 = N(params, diag s²): by
default s is Glorot-normal per weight leaf (√(2 / (fan_in + fan_out)), with fan sizes
taken from the leaf's last two axes and any leading axes as a receptive field) and
``bias_scale`` for vectors and scalars. Biases need a spread too: EKI keeps every member
in the affine span of the initial ensemble, so a coordinate on which all members agree
never moves. Pass ``prior_scale`` (a float, a flat ``(d,)`` array or a PyTree like
``params``) to choose another μ0. To draw members independently around zero, as the
paper does, pass a PyTree of zeros as ``params``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from eki_infer.ml.losses import get_loss, member_losses
from eki_infer.ml.training import check_training_data, eki_ml, fit, respread_schedule
from eki_infer.validation import check_count

__all__ = [
    "PyTreeFit",
    "ensemble_forward",
    "fit_pytree",
    "glorot_scale",
    "initial_ensemble",
]

VARIANTS = ("eki", "eki_r", "meki", "meki_r")


def glorot_scale(params, bias_scale: float = 0.1):
    """Per-coordinate prior standard deviations s, flattened like ``ravel_pytree``.

    Leaves with two or more axes get √(2 / (fan_in + fan_out)) with fan_in, fan_out the
    last two axes times the product of the others (a convolution's receptive field);
    vectors and scalars get ``bias_scale``.
    """

    def leaf_scale(leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim >= 2:
            receptive = math.prod(leaf.shape[:-2])
            fans = (leaf.shape[-2] + leaf.shape[-1]) * receptive
            value = math.sqrt(2.0 / fans)
        else:
            value = bias_scale
        return jnp.full(leaf.shape, value, dtype=leaf.dtype)

    return ravel_pytree(jax.tree_util.tree_map(leaf_scale, params))[0]


def _flat_scale(prior_scale, params, flat):
    if prior_scale is None:
        return glorot_scale(params)
    if isinstance(prior_scale, int | float):
        return jnp.full(flat.shape, float(prior_scale), dtype=flat.dtype)
    leaves = jax.tree_util.tree_leaves(prior_scale)
    if len(leaves) == 1 and jnp.ndim(leaves[0]) == 1 and leaves[0].shape == flat.shape:
        return jnp.asarray(leaves[0], dtype=flat.dtype)
    return ravel_pytree(prior_scale)[0].astype(flat.dtype)


def initial_ensemble(rng_key, params, ensemble_size: int, prior_scale=None):
    """Draws J members from μ0 = N(ravel(params), diag s²).

    Returns:
        ``(particles (J, d), scale (d,), unravel)``.
    """
    flat, unravel = ravel_pytree(params)
    scale = _flat_scale(prior_scale, params, flat)
    z = jax.random.normal(rng_key, (int(ensemble_size), flat.size), dtype=flat.dtype)
    return flat + scale * z, scale, unravel


def ensemble_forward(apply_fn: Callable, unravel: Callable) -> Callable:
    """``forward(particles (J, d), x)`` = ``vmap`` over members of ``apply_fn(params, x)``."""

    def forward(particles, x):
        return jax.vmap(lambda p: apply_fn(unravel(p), x))(particles)

    return forward


class PyTreeFit(NamedTuple):
    """Result of :func:`fit_pytree`.

    Attributes:
        params: the mean particle ū as a PyTree like the input ``params``.
        best_params: the member with the lowest loss on the selection data (the
            training data unless ``select_on`` was given).
        particles: the final ensemble, ``(J, d)``.
        unravel: maps a ``(d,)`` vector back to a PyTree.
        history: per-epoch history (see :class:`eki_infer.ml.training.FitResult`).
        state: the final :class:`~eki_infer.ml.training.EKIMLState` (particles, the
            previous ensemble and the counters; fit_pytree starts afresh, so to go on
            training pass it as ``state`` to :func:`~eki_infer.ml.training.fit` with the
            same kernel).
    """

    params: object
    best_params: object
    particles: jax.Array
    unravel: Callable
    history: dict
    state: object


def fit_pytree(
    rng_key,
    apply_fn: Callable,
    params,
    x,
    y,
    loss="cross_entropy_logits",
    *,
    ensemble_size: int = 200,
    epochs: int = 20,
    batch_size: int = 100,
    variant: str = "eki_r",
    h: float = 1.0,
    eps: float = 1e-8,
    momentum=None,
    respread: Callable | None = None,
    prior_scale=None,
    form: str = "explicit",
    select_on: tuple | None = None,
    on_epoch: Callable | None = None,
) -> PyTreeFit:
    """Trains ``apply_fn(params, x)`` with loss-general EKI and mini-batches.

    Args:
        rng_key: PRNG key.
        apply_fn: the network, ``apply_fn(params, x_batch) -> output`` (e.g. logits of
            shape ``(batch, classes)``); never differentiated.
        params: a parameter PyTree: the centre of μ0 and the structure of the result.
        x, y: training inputs and targets (``y`` one-hot for the cross-entropies).
        loss: Ψ(z, y) for one member on a batch (callable or name); default cross-entropy
            on logits.
        ensemble_size: J.
        epochs, batch_size: passes over the data and examples per step (a fresh batch
            every step).
        variant: ``"eki"``, ``"eki_r"`` (re-spreading, default), ``"meki"`` (Nesterov
            momentum) or ``"meki_r"`` — shorthands that set ``momentum`` and
            ``respread`` when those are not given. The (R) default re-spreads once per
            epoch at γ = 1 (:func:`~eki_infer.ml.training.respread_schedule`).
        h, eps: the adaptive step h_n = h / (‖D‖_F + ε).
        momentum: overrides the variant's momentum (``"nesterov"`` or a constant λ).
        respread: overrides the variant's γ(n) schedule.
        prior_scale: s of μ0 (see the module docstring); default Glorot.
        form: ``"explicit"`` or ``"kalman"``.
        select_on: ``(x_sel, y_sel)`` on which the best particle is chosen (default:
            the training data).
        on_epoch: ``on_epoch(epoch, state) -> dict`` recorded in the history.

    Returns:
        A :class:`PyTreeFit`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    check_count("ensemble_size", ensemble_size, 2)
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    n = check_training_data(x, y)
    if select_on is not None:
        if not (isinstance(select_on, tuple | list) and len(select_on) == 2):
            raise ValueError("select_on must be a pair (x_sel, y_sel).")
        check_training_data(*select_on)
    loss = get_loss(loss)
    k_init, k_fit = jax.random.split(rng_key)
    particles, scale, unravel = initial_ensemble(k_init, params, ensemble_size, prior_scale)
    forward = ensemble_forward(apply_fn, unravel)
    steps_per_epoch = max(n // min(int(batch_size), n), 1)
    if momentum is None and variant.startswith("meki"):
        momentum = "nesterov"
    if respread is None and variant.endswith("_r"):
        respread = respread_schedule(1.0, every=steps_per_epoch)
    kernel = eki_ml(
        loss, h=h, eps=eps, momentum=momentum, respread=respread, prior_scale=scale, form=form
    )
    result = fit(
        k_fit,
        kernel,
        forward,
        particles,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        on_epoch=on_epoch,
    )
    final = result.state.particles
    x_sel, y_sel = (x, y) if select_on is None else select_on
    best = int(jnp.argmin(member_losses(loss, forward(final, x_sel), y_sel)))
    return PyTreeFit(
        params=unravel(jnp.mean(final, axis=0)),
        best_params=unravel(final[best]),
        particles=final,
        unravel=unravel,
        history=result.history,
        state=result.state,
    )

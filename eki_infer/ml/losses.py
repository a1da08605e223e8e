"""Losses Ψ(z, y) on the forward-map output z, and their gradients ∇_z Ψ.

Loss-general EKI (Kovachki & Stuart 2019; ALGORITHMS.md §7) replaces the Gaussian
residual Γ⁻¹(G(u^(j)) − y) of ensemble Kalman inversion by the gradient ∇_z Ψ(G(u^(j)), y)
of a loss on the *output* of the forward map. Only the loss is differentiated (with
``jax.grad``), never the forward map: the network G may be a black box.

A loss is any callable ``loss(z, y) -> scalar`` for **one** ensemble member, where ``z``
is that member's output (an array or any PyTree of arrays, e.g. ``(batch, classes)``
probabilities) and ``y`` the matching data. Built in:

- :func:`squared_error` — Ψ = ½‖Γ^{-1/2}(z − y)‖², ∇Ψ = Γ⁻¹(z − y): exactly the Gaussian
  data misfit of EKI (optionally with one of :mod:`eki_infer.noise`'s covariances);
- :func:`cross_entropy` — Ψ = −⟨y, log z⟩ on probabilities z, ∇Ψ = −y / z;
- :func:`cross_entropy_logits` — the same loss on logits a, z = softmax(a) row by row,
  ∇Ψ = softmax(a)·Σy − y (computed stably with ``log_softmax``).

Losses are **summed** over the batch, as in the paper. The adaptive step
h_n = h / (‖D‖ + ε) makes the EKI update (almost exactly) invariant to a rescaling of Ψ,
so sum and mean give the same trajectory; for gradient baselines use the mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from eki_infer.noise import ScalarNoise

__all__ = [
    "LOSSES",
    "cross_entropy",
    "cross_entropy_logits",
    "get_loss",
    "inexact_leaves",
    "loss_gradients",
    "member_losses",
    "squared_error",
]


def squared_error(noise=None) -> Callable:
    """Ψ(z, y) = ½‖Γ^{-1/2}(z − y)‖², the Gaussian data misfit.

    Args:
        noise: ``None`` (Γ = I), a positive scalar variance, or a
            :class:`eki_infer.noise.Noise` whose ``whiten`` applies Γ^{-1/2} to the
            flattened residual (its ``dim`` must equal the output size).

    Returns:
        ``loss(z, y)``; z and y arrays of the same shape.
    """
    if noise is None:

        def whiten(r):
            return r

    elif hasattr(noise, "whiten"):
        whiten = noise.whiten
    else:
        scale = 1.0 / jnp.sqrt(jnp.asarray(noise))

        def whiten(r):
            return r * scale

    def loss(z, y):
        _same_shape("squared_error", z, y)
        r = jnp.ravel(jnp.asarray(z) - jnp.asarray(y))
        dim = getattr(noise, "dim", None)
        if dim is not None and dim != r.size and not isinstance(noise, ScalarNoise):
            raise ValueError(
                f"squared_error: the noise has dim {dim} but the output has {r.size} entries."
            )
        w = whiten(r)
        return 0.5 * jnp.sum(w * w)

    return loss


def cross_entropy(z, y):
    """Ψ(z, y) = −⟨y, log z⟩ for probabilities z (e.g. softmax outputs), y one-hot or
    soft labels of the same shape. ∇_z Ψ = −y / z (Kovachki & Stuart's choice)."""
    _same_shape("cross_entropy", z, y)
    return -jnp.sum(jnp.asarray(y) * jnp.log(z))


def cross_entropy_logits(z, y):
    """Cross-entropy on logits: Ψ(a, y) = −⟨y, log softmax(a)⟩ over the last axis.

    Equal to :func:`cross_entropy` at z = softmax(a); its gradient
    softmax(a)·Σ_c y_c − y is bounded, whereas −y / z blows up as a probability → 0.
    """
    _same_shape("cross_entropy_logits", z, y)
    return -jnp.sum(jnp.asarray(y) * jax.nn.log_softmax(z, axis=-1))


def _same_shape(name, z, y):
    """The built-in losses compare one member's output with its target entry by entry:
    a shape mismatch would broadcast into a different loss, so it is an error (raised
    when the loss is traced, from the static shapes)."""
    if jnp.shape(z) != jnp.shape(y):
        raise ValueError(
            f"{name}: one member's output has shape {jnp.shape(z)} and the target "
            f"{jnp.shape(y)}; they must match (targets of the cross-entropies are one-hot "
            "or soft labels, e.g. jax.nn.one_hot(labels, num_classes))."
        )


LOSSES = {
    "squared_error": squared_error(),
    "cross_entropy": cross_entropy,
    "cross_entropy_logits": cross_entropy_logits,
}


def get_loss(loss) -> Callable:
    """A loss callable from a name in :data:`LOSSES` or a callable (returned as is)."""
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except (KeyError, TypeError):
        raise ValueError(
            f"loss must be a callable loss(z, y) or one of {sorted(LOSSES)}, got {loss!r}."
        ) from None


def inexact_leaves(tree):
    """The floating-point leaves of a PyTree (integer leaves carry no direction)."""
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]


def _data_axis(outputs, y):
    """0 when ``y`` carries a leading member axis (one data set per member), else None.

    Per-member data are recognised by matching the outputs leaf by leaf in number of
    dimensions and in the leading (member) axis J. (Shared data whose own leading axis
    happens to equal J and whose rank equals the outputs' would be misread: pass
    ``jnp.broadcast_to(y, ...)`` explicitly in that corner case.)"""
    out_leaves = jax.tree_util.tree_leaves(outputs)
    y_leaves = jax.tree_util.tree_leaves(y)
    if not out_leaves or len(out_leaves) != len(y_leaves):
        return None
    for a, b in zip(out_leaves, y_leaves, strict=True):
        if jnp.ndim(a) != jnp.ndim(b) or jnp.ndim(a) == 0 or jnp.shape(a)[0] != jnp.shape(b)[0]:
            return None
    return 0


def member_losses(loss, outputs, y):
    """Ψ(G(u^(j)), y) for every member: ``outputs`` has a leading member axis J (every
    leaf), ``y`` is shared or has the same leading axis (one data set per member).
    Returns shape ``(J,)``."""
    loss = get_loss(loss)
    return jax.vmap(loss, in_axes=(0, _data_axis(outputs, y)))(outputs, y)


def loss_gradients(loss, outputs, y):
    """∇_z Ψ(G(u^(j)), y) for every member, by ``jax.grad`` of the loss alone.

    Args:
        loss: a loss callable or name (see :func:`get_loss`).
        outputs: forward-map outputs with a leading member axis J (an array or a PyTree
            whose every leaf has that axis).
        y: the data, shared by all members, or with a leading member axis (e.g. the
            perturbed observations of Gaussian EKI).

    Returns:
        A PyTree like ``outputs`` (integer leaves get float0 zeros and are ignored by the
        updates).
    """
    loss = get_loss(loss)
    grad = jax.grad(loss, allow_int=True)
    return jax.vmap(grad, in_axes=(0, _data_axis(outputs, y)))(outputs, y)

"""EKI for machine learning (Kovachki & Stuart 2019; ALGORITHMS.md §7).

Derivative-free training with any loss on the forward-map output:

- :mod:`eki_infer.ml.losses` — losses Ψ(z, y) and ∇_z Ψ by ``jax.grad`` of the loss only;
- :mod:`eki_infer.ml.training` — the discrete scheme u ← u − h_n D(u) u with the adaptive
  step, Nesterov or constant momentum, mini-batches, re-spreading (the (R) variants),
  predictions from the mean or best particle, and streaming updates;
- :mod:`eki_infer.ml.pytree` — training ``f(params, x)`` over any parameter PyTree;
- :mod:`eki_infer.ml.numpyro_model` — :class:`EKIOptimizer`, an optimisation mode for
  NumPyro models with non-Gaussian likelihoods (a point estimate, not a posterior).
"""

from eki_infer.ml.losses import (
    LOSSES,
    cross_entropy,
    cross_entropy_logits,
    get_loss,
    loss_gradients,
    member_losses,
    squared_error,
)
from eki_infer.ml.numpyro_model import EKIOptimizer, EKIOptimizerResult
from eki_infer.ml.pytree import (
    PyTreeFit,
    ensemble_forward,
    fit_pytree,
    glorot_scale,
    initial_ensemble,
)
from eki_infer.ml.training import (
    EKIMLInfo,
    EKIMLKernel,
    EKIMLState,
    FitResult,
    OnlineEKI,
    apply_respread,
    batch_indices,
    best_particle,
    eki_ml,
    ensemble_d_matrix,
    fit,
    loss_eki_update,
    momentum_point,
    predict,
    respread_schedule,
)

__all__ = [
    "LOSSES",
    "EKIMLInfo",
    "EKIMLKernel",
    "EKIMLState",
    "EKIOptimizer",
    "EKIOptimizerResult",
    "FitResult",
    "OnlineEKI",
    "PyTreeFit",
    "apply_respread",
    "batch_indices",
    "best_particle",
    "cross_entropy",
    "cross_entropy_logits",
    "eki_ml",
    "ensemble_d_matrix",
    "ensemble_forward",
    "fit",
    "fit_pytree",
    "get_loss",
    "glorot_scale",
    "initial_ensemble",
    "loss_eki_update",
    "loss_gradients",
    "member_losses",
    "momentum_point",
    "predict",
    "respread_schedule",
    "squared_error",
]

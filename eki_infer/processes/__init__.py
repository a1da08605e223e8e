"""Ensemble Kalman processes: EKI, EKS/ALDI and UKI as pure functions over NamedTuple
states (see :mod:`eki_infer.processes.base` for the shared conventions: rows are
members, whitened output space, 1/n covariance normalisation, J × J algebra, failure
redraws, and Δt = 0 as a no-op)."""

from eki_infer.processes.base import (
    EnsembleDivergenceError,
    EnsembleFailureError,
    EnsembleProcess,
    EnsembleState,
    check_divergence,
    check_failures,
    detect_failures,
)
from eki_infer.processes.eki import EKI_VARIANTS, eki, eki_perturbed_update, eki_transform_update
from eki_infer.processes.eks import eks, eks_update
from eki_infer.processes.uki import (
    UKI_MODES,
    UKIState,
    sigma_points,
    uki,
    uki_predict,
    uki_update,
)

__all__ = [
    "EKI_VARIANTS",
    "UKI_MODES",
    "EnsembleDivergenceError",
    "EnsembleFailureError",
    "EnsembleProcess",
    "EnsembleState",
    "UKIState",
    "check_divergence",
    "check_failures",
    "detect_failures",
    "eki",
    "eki_perturbed_update",
    "eki_transform_update",
    "eks",
    "eks_update",
    "sigma_points",
    "uki",
    "uki_predict",
    "uki_update",
]

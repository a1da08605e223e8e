"""eki_infer: derivative-free Bayesian calibration of NumPyro models with ensemble Kalman
methods (EKI, EKS/ALDI, UKI), returning ArviZ objects.

The main entry point is :class:`EKIInference`; :func:`trace_model` exposes the inverse
problem a model defines (prior transform, forward map, data, noise), and
:mod:`eki_infer.processes` / :mod:`eki_infer.schedulers` hold the algorithms as pure
functions for those who want to drive them directly.
"""

from eki_infer.inference import METHODS, EKIInference, RunHistory, SchedulerError
from eki_infer.noise import (
    BlockNoise,
    DenseNoise,
    DiagonalNoise,
    LowRankNoise,
    ScalarNoise,
    block_diagonal,
)
from eki_infer.nuts import run_nuts
from eki_infer.processes import EnsembleFailureError
from eki_infer.schedulers import DataMisfitController, DefaultScheduler, EKSStableScheduler
from eki_infer.tracing import InverseProblem, ModelTracingError, trace_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BlockNoise",
    "DataMisfitController",
    "DefaultScheduler",
    "DenseNoise",
    "DiagonalNoise",
    "EKIInference",
    "EKSStableScheduler",
    "EnsembleFailureError",
    "InverseProblem",
    "LowRankNoise",
    "ModelTracingError",
    "RunHistory",
    "ScalarNoise",
    "SchedulerError",
    "block_diagonal",
    "run_nuts",
    "trace_model",
]

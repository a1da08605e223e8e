"""eki_infer: derivative-free Bayesian calibration of NumPyro models with ensemble Kalman
methods (EKI, EKS/ALDI, UKI) and a calibrated tempered SMC, returning ArviZ objects.

The main entry point is :class:`EKIInference`; :func:`trace_model` exposes the inverse
problem a model defines (prior transform, forward map, data, noise), and
:mod:`eki_infer.processes` / :mod:`eki_infer.schedulers` hold the algorithms as pure
functions for those who want to drive them directly.
"""

from eki_infer.compare import Comparison, compare, energy_distance, wasserstein_1d
from eki_infer.diagnostics import gaussian_approximation_check
from eki_infer.executors import DaskExecutor, ProcessExecutor, SerialExecutor, ThreadExecutor
from eki_infer.inference import METHODS, EKIInference, RunHistory, SchedulerError
from eki_infer.ml import EKIOptimizer, OnlineEKI, fit_pytree
from eki_infer.noise import (
    BlockNoise,
    DenseNoise,
    DiagonalNoise,
    EventBlocksNoise,
    LowRankNoise,
    ScalarNoise,
    block_diagonal,
)
from eki_infer.nuts import run_nuts
from eki_infer.processes import EnsembleDivergenceError, EnsembleFailureError
from eki_infer.schedulers import DataMisfitController, DefaultScheduler, EKSStableScheduler
from eki_infer.simulators import BlackBoxGradientError, black_box
from eki_infer.smc import SMCError
from eki_infer.tracing import InverseProblem, ModelTracingError, trace_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BlackBoxGradientError",
    "BlockNoise",
    "Comparison",
    "DaskExecutor",
    "DataMisfitController",
    "DefaultScheduler",
    "DenseNoise",
    "DiagonalNoise",
    "EKIInference",
    "EKIOptimizer",
    "EKSStableScheduler",
    "EnsembleDivergenceError",
    "EnsembleFailureError",
    "EventBlocksNoise",
    "InverseProblem",
    "LowRankNoise",
    "ModelTracingError",
    "OnlineEKI",
    "ProcessExecutor",
    "RunHistory",
    "SMCError",
    "ScalarNoise",
    "SchedulerError",
    "SerialExecutor",
    "ThreadExecutor",
    "black_box",
    "block_diagonal",
    "compare",
    "energy_distance",
    "fit_pytree",
    "gaussian_approximation_check",
    "run_nuts",
    "trace_model",
    "wasserstein_1d",
]

"""From a NumPyro model to an inverse problem y = G(u) + η for ensemble Kalman methods.

- :mod:`~eki_infer.tracing.problem`: :func:`trace_model` and :class:`InverseProblem`,
- :mod:`~eki_infer.tracing.priors`: exact whitened transforms u ~ N(0, I) -> prior,
- :mod:`~eki_infer.tracing.likelihoods`: Gaussian observation sites -> mean and noise Γ,
- :mod:`~eki_infer.tracing.errors`: :class:`ModelTracingError`.
"""

from eki_infer.tracing.errors import ModelTracingError
from eki_infer.tracing.likelihoods import GAUSSIAN_LIKELIHOODS
from eki_infer.tracing.priors import (
    SUPPORTED_PRIOR_FAMILIES,
    whitened_shape,
    whitened_transform,
)
from eki_infer.tracing.problem import (
    DeterministicSite,
    InverseProblem,
    LatentSite,
    ObservedSite,
    trace_model,
)

__all__ = [
    "GAUSSIAN_LIKELIHOODS",
    "SUPPORTED_PRIOR_FAMILIES",
    "DeterministicSite",
    "InverseProblem",
    "LatentSite",
    "ModelTracingError",
    "ObservedSite",
    "trace_model",
    "whitened_shape",
    "whitened_transform",
]

"""The one exception the tracer raises for models it cannot turn into an inverse problem.

Every message names the offending site (``site`` attribute) and, where there is one, says
how to rewrite the model so that it can be served.
"""

from __future__ import annotations

__all__ = ["ModelTracingError"]


class ModelTracingError(ValueError):
    """A NumPyro model that cannot be traced into an :class:`InverseProblem`.

    Attributes:
        site: name of the sample site at fault, or ``None`` for whole-model problems
            (no latent site, no observed site).
    """

    def __init__(self, message: str, site: str | None = None):
        super().__init__(message)
        self.site = site

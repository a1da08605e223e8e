"""Reference NumPyro models for tests, benchmarks and notebooks.

Every module here has the same shape:

- ``model(*args, y=None)``: an ordinary NumPyro model; ``y=None`` gives the prior
  predictive, ``y=y_obs`` conditions on data. The likelihood is a Gaussian site
  named ``"y"`` with known, fixed noise.
- ``simulate_data(rng_key, ...) -> (args, y)``: the model's positional arguments as
  a tuple and data simulated from the truth, so ``model(*args, y=y)`` is the
  conditioned model (``eight_schools`` returns the classic data by default).
- ``forward(...)``: the noise-free forward map, pure JAX (jit- and vmap-able).
- ``TRUE_PARAMS``: the truth, a dict keyed by latent site name.
- ``exact_posterior(*args, y) -> (mean, cov)`` where one exists (``linear_gaussian``
  in closed form, ``exp_sine`` by quadrature), in the latent sites' flattened order.

``REFERENCE_MODELS`` maps each name to its module, imported on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

__all__ = ["REFERENCE_MODELS"]

_NAMES = (
    "exp_sine",
    "linear_gaussian",
    "lorenz96",
    "darcy",
    "sir",
    "eight_schools",
)


class _LazyModules(Mapping):
    """Read-only ``{name: module}`` that imports ``models.<name>`` on first access."""

    def __init__(self, names):
        self._names = tuple(names)

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._names:
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"REFERENCE_MODELS({', '.join(self._names)})"


REFERENCE_MODELS: Mapping[str, ModuleType] = _LazyModules(_NAMES)

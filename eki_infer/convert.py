"""ArviZ output on both ArviZ lines, through ArviZ's own converters.

arviz 0.2x (Python 3.11) builds an ``arviz.InferenceData``; arviz 1.x (Python ≥ 3.12)
builds an ``xarray.DataTree``. Both expose ``az.from_dict`` but with different call
shapes; :func:`to_arviz` hides that difference so the rest of the package never asks
which line is installed.

Conventions (documented for users in the README):

- ``posterior``: dims (chain, draw, ...): chain = independent ensemble, draw = member
  (EKI/EKS) or Gaussian draw (UKI). Latent and deterministic sites.
- ``prior``: the initial ensemble pushed through the prior transform.
- ``posterior_predictive``: observation draws G(u) + N(0, Γ) per member.
- ``log_likelihood``: pointwise log-likelihood (LOO/WAIC), per event of each observed
  site as NumPyro gives it (a plate element; a ``.to_event`` site is one).
- ``observed_data``: the data.
- ``sample_stats``: per-draw ``data_misfit`` (½‖Γ^{-1/2}(y − G(u))‖²) and ``failed``.
- ``ensemble_history``: per-iteration arrays with dims (chain, iteration): ``t``, ``dt``,
  ``misfit_mean``, ``misfit_sd``, ``num_failed``, ``forward_evaluations`` (cumulative)
  and ``wall_time`` (cumulative seconds).
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np

__all__ = ["ARVIZ_1", "history_dataset", "to_arviz"]

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1


def _clean(group: dict | None) -> dict:
    return {k: np.asarray(v) for k, v in (group or {}).items()}


def history_dataset(history: dict):
    """Per-iteration history (arrays of shape (chain, iteration)) as an xarray Dataset."""
    import xarray as xr

    data_vars = {}
    for name, values in history.items():
        values = np.asarray(values)
        data_vars[name] = (("chain", "iteration"), values)
    num_chains, num_iterations = next(iter(history.values())).shape
    return xr.Dataset(
        data_vars,
        coords={"chain": np.arange(num_chains), "iteration": np.arange(num_iterations)},
    )


def to_arviz(
    *,
    posterior: dict,
    prior: dict | None = None,
    posterior_predictive: dict | None = None,
    log_likelihood: dict | None = None,
    observed_data: dict | None = None,
    sample_stats: dict | None = None,
    history: dict | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    attrs: dict | None = None,
):
    """Builds the native ArviZ container of the installed ArviZ line.

    Every sample group holds arrays with leading (chain, draw) axes; ``observed_data``
    holds arrays without them; ``history`` holds (chain, iteration) arrays and becomes
    the ``ensemble_history`` group.
    """
    groups = {
        "posterior": _clean(posterior),
        "prior": _clean(prior),
        "posterior_predictive": _clean(posterior_predictive),
        "log_likelihood": _clean(log_likelihood),
        "observed_data": _clean(observed_data),
        "sample_stats": _clean(sample_stats),
    }
    groups = {name: values for name, values in groups.items() if values}
    attrs = dict(attrs or {})
    attrs.setdefault("inference_library", "eki_infer")
    coords = dict(coords or {})
    dims = dict(dims or {})

    if ARVIZ_1:
        tree = az.from_dict(
            groups,
            coords=coords,
            dims=dims,
            attrs={name: dict(attrs) for name in groups},
        )
        if history:
            tree["ensemble_history"] = history_dataset(history)
            tree["ensemble_history"].attrs.update(attrs)
        tree.attrs.update(attrs)  # the root too, so that tree.attrs answers as on 0.x
        return tree

    idata = az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)
    if history:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ensemble_history.*")
            idata.add_groups({"ensemble_history": history_dataset(history)})
    for name in idata.groups():  # every group carries them, as on 1.x
        getattr(idata, name).attrs.update(attrs)
    return idata


def group(data, name: str):
    """The ``name`` group of either container as an xarray Dataset."""
    if ARVIZ_1:
        return data[name].to_dataset()
    return getattr(data, name)

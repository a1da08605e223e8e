"""1-D Darcy flow: log-permeability field from pointwise pressure.

What it is
    -(k(x) p'(x))' = f(x) on [0, 1], p(0) = p(1) = 0, with constant source f = 1 and
    log-permeability expanded in a truncated Karhunen-Loève series,

        log k(x) = Σ_{i=1..n} sqrt(λ_i) ξ_i φ_i(x),   φ_i(x) = √2 sin(iπx),
        λ_i = τ^{2α-1} (π² i² + τ²)^{-α}     (α = 2, τ = 3 by default),

    the eigenpairs of the Matérn-like covariance τ^{2α-1} (-d²/dx² + τ²)^{-α} with
    Dirichlet conditions (Dunlop & Stuart's normalisation, so the field's variance is
    O(1) for any τ). Unknowns: ξ ~ N(0, I_n) (site ``kl_coefficients``, shape (n,),
    default n = 8). Forward map: a second-order finite-difference solve on a uniform
    grid of ``num_cells`` cells (default 64; k at the cell mid-points, a tridiagonal
    system solved by ``jnp.linalg.solve``), pressure read at ``num_obs`` equispaced
    interior nodes (default 15). Noise: Γ = σ² I with σ = 0.002 (about 2 % of the
    typical peak pressure 0.1).

Source
    The 1-D elliptic inverse problem of Iglesias, Law & Stuart (2013), "Ensemble
    Kalman methods for inverse problems", and Dunlop & Stuart's KL priors; the
    EnsembleKalmanProcesses.jl Darcy example is its 2-D version (Matérn GRF with a
    KL expansion, pressure at a sub-grid, truth with all KL coefficients equal).

Easy / hard for ensemble Kalman methods
    Easy: Gaussian prior in the native coordinates (the KL coefficients are already
    whitened), smooth forward map, moderate dimension, cheap solves. Hard: the map
    ξ -> p is nonlinear (p depends on 1/k = exp(-log k)), so the posterior is
    non-Gaussian; the high KL modes are barely informed by 15 point values, so the
    posterior is highly anisotropic (a few well-determined directions, the rest
    prior-dominated) and an ensemble of size J ≤ n stays in its initial subspace.
    No closed-form posterior.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = [
    "NOISE_SCALE",
    "TRUE_PARAMS",
    "forward",
    "kl_basis",
    "log_permeability",
    "model",
    "observation_indices",
    "simulate_data",
    "solve_pressure",
]

NOISE_SCALE = 0.002
"""σ: known observation noise standard deviation (Γ = σ² I)."""

TRUE_PARAMS = {"kl_coefficients": np.array([1.0, -0.8, 0.6, 0.5, -0.4, 0.3, -0.2, 0.1])}
"""Truth for the default n = 8; for another n, :func:`simulate_data` draws ξ from the prior."""


def kl_basis(n: int = 8, num_cells: int = 64, alpha: float = 2.0, tau: float = 3.0, dtype=None):
    """Scaled KL basis at the cell mid-points: (n, num_cells) rows sqrt(λ_i) φ_i(x_mid)."""
    i = jnp.arange(1, n + 1, dtype=dtype)
    lam = tau ** (2.0 * alpha - 1.0) * (math.pi**2 * i**2 + tau**2) ** (-alpha)
    x_mid = (jnp.arange(num_cells, dtype=dtype) + 0.5) / num_cells
    phi = math.sqrt(2.0) * jnp.sin(math.pi * i[:, None] * x_mid[None, :])
    return jnp.sqrt(lam)[:, None] * phi


def log_permeability(xi, basis):
    """log k at the cell mid-points, (num_cells,)."""
    return xi @ basis


def solve_pressure(log_k, source: float = 1.0):
    """Pressure at the interior nodes, (num_cells - 1,), for the cell log-permeabilities.

    Finite differences: with h = 1/N and k_{j+1/2} the mid-point values,
    (k_{j-1/2}(p_j - p_{j-1}) - k_{j+1/2}(p_{j+1} - p_j)) / h² = f, p_0 = p_N = 0.
    """
    num_cells = log_k.shape[-1]
    h = 1.0 / num_cells
    k = jnp.exp(log_k)
    diag = (k[:-1] + k[1:]) / h**2
    off = -k[1:-1] / h**2
    A = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    rhs = jnp.full(diag.shape, source, dtype=diag.dtype)
    return jnp.linalg.solve(A, rhs)


def observation_indices(num_cells: int = 64, num_obs: int = 15) -> np.ndarray:
    """Indices into the interior-node vector of ``num_obs`` equispaced sensors."""
    nodes = np.round(np.arange(1, num_obs + 1) * num_cells / (num_obs + 1)).astype(int)
    return nodes - 1  # interior node j (1..N-1) sits at position j - 1


def forward(xi, basis, obs_idx):
    """Noise-free pressures at the sensors, (num_obs,). Pure JAX; jit/vmap over ``xi``."""
    return solve_pressure(log_permeability(xi, basis))[obs_idx]


def model(basis, obs_idx, noise_scale=NOISE_SCALE, y=None):
    """NumPyro model.

    ``basis``: (n, num_cells) from :func:`kl_basis`; ``obs_idx``: (num_obs,) integer
    sensor indices from :func:`observation_indices`; ``noise_scale``: σ (known);
    ``y``: (num_obs,). Latent site ``kl_coefficients`` (n,); observed site ``y``.
    """
    n = basis.shape[0]
    xi = numpyro.sample("kl_coefficients", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
    numpyro.sample("y", dist.Normal(forward(xi, basis, obs_idx), noise_scale).to_event(1), obs=y)


def simulate_data(
    rng_key,
    n: int = 8,
    num_cells: int = 64,
    num_obs: int = 15,
    noise_scale: float = NOISE_SCALE,
    params=None,
):
    """Return ``(args, y)`` with ``args = (basis, obs_idx, noise_scale)``: ``model(*args, y=y)``.

    The truth is ``params["kl_coefficients"]`` if given, else ``TRUE_PARAMS`` when
    n = 8, else a draw from the prior.
    """
    k_xi, k_eps = jax.random.split(rng_key)
    basis = kl_basis(n, num_cells)
    obs_idx = jnp.asarray(observation_indices(num_cells, num_obs))
    if params is not None:
        xi = jnp.asarray(params["kl_coefficients"])
    elif n == TRUE_PARAMS["kl_coefficients"].shape[0]:
        xi = jnp.asarray(TRUE_PARAMS["kl_coefficients"])
    else:
        xi = jax.random.normal(k_xi, (n,))
    g = forward(xi, basis, obs_idx)
    y = g + noise_scale * jax.random.normal(k_eps, g.shape, g.dtype)
    return (basis, obs_idx, noise_scale), y

"""Gamma, Beta and StudentT quantiles at large shape parameters, from expansions in 1/a.

Why: the numerical inversion in :mod:`~eki_infer.tracing.priors` solves log F(x) = log p,
and for a large shape a every evaluation of log F subtracts terms of size a·log a (the
Gamma density's a·log x − x − log Γ(a), the Beta's a·log x + b·log(1 − x) − log B(a, b)).
In float32 that rounding error grows in proportion to a: before these expansions the
float32 Gamma(1e6) quantile was off by 0.7 prior sds, Beta(1e5, 1e5) by 0.08 and
StudentT(1e6) by 0.04. The expansions below never form those terms, and their
truncation error falls with a, so above the thresholds ``*_MIN`` (used in float32 only;
float64 keeps the inversion, accurate to ~1e-13 there) they are the accurate choice.
Truncation errors, measured in float64 against scipy over |u| <= 13 (``u`` the standard
normal quantile of the probability, as everywhere in the transforms):

- Gamma, Temme's uniform asymptotic inversion (Temme 1992, "Asymptotic inversion of
  incomplete gamma functions", Math. Comp. 58), η = η₀ + ε₁(η₀)/a + ε₂(η₀)/a² with
  η₀ = u/√a and x = a·λ(η), λ − 1 − log λ = η²/2: below 1.2e-6 prior sd at a = 300
  and 2e-8 at a = 1000 (the float32 inversion: ~1e-4 and 5e-4);
- Beta, the Cornish–Fisher expansion of t = logit x = log G_a − log G_b (independent
  Gamma draws), whose cumulants are exact: κ₁ = ψ(a) − ψ(b), κₙ = ψ⁽ⁿ⁻¹⁾(a) +
  (−1)ⁿ ψ⁽ⁿ⁻¹⁾(b), to third order (κ₅): below 1.2e-6 sd for |u| <= 6 and 1e-4 sd at
  |u| = 13 once min(a, b) >= 1000 (the inversion: ~5e-4);
- StudentT, the Fisher expansion in 1/ν to fourth order (Hill 1970, "Algorithm 396:
  Student's t-quantiles", CACM 13): below 1.5e-7 sd at ν = 1000 (the inversion: 1e-5).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
    "FLOAT32_BETA_MIN",
    "FLOAT32_GAMMA_MIN",
    "FLOAT32_STUDENTT_MIN",
    "beta_logit_quantile_large",
    "gamma_log_quantile_large",
    "gamma_quantile_large",
    "studentt_quantile_large",
]

#: in float32, concentrations from which the Gamma expansion replaces the inversion
FLOAT32_GAMMA_MIN = 300.0
#: in float32, min(concentration1, concentration0) from which the Beta expansion does
FLOAT32_BETA_MIN = 1000.0
#: in float32, degrees of freedom from which the StudentT expansion does
FLOAT32_STUDENTT_MIN = 1000.0


def _horner(coefficients, x):
    """Σ_k coefficients[k] · x^k."""
    total = jnp.zeros_like(x)
    for c in reversed(coefficients):
        total = total * x + c
    return total


# μ = λ − 1 as a power series in η, the inverse of η²/2 = μ − log(1 + μ) with sign(η) =
# sign(μ); its terms beyond η⁸ stay below 1e-9 relative for |η| <= 0.8 (a >= 300 in float32)
_MU_OF_ETA = (0.0, 1.0, 1 / 3, 1 / 36, -1 / 270, 1 / 4320, 1 / 17010, -139 / 5443200, 1 / 204120)
# Temme's ε₁(η) and ε₂(η) as power series (the closed ε₁ = log(η/μ)/η cancels near η = 0)
_EPSILON_1 = (-1 / 3, 1 / 36, 1 / 1620, -7 / 6480, 5 / 18144)
_EPSILON_2 = (-7 / 405, -7 / 2592, 533 / 204120)


def _gamma_relative_quantile(a, u):
    """λ − 1 with a·λ the Gamma(a, 1) quantile at Φ(u): η = η₀ + ε₁/a + ε₂/a², η₀ = u/√a
    (Temme 1992), then λ − 1 = μ(η)."""
    eta0 = u / jnp.sqrt(a)
    eta = eta0 + _horner(_EPSILON_1, eta0) / a + _horner(_EPSILON_2, eta0) / (a * a)
    return _horner(_MU_OF_ETA, eta)


def gamma_log_quantile_large(concentration, u):
    """log x with x the Gamma(concentration, 1) quantile at Φ(u), for a large
    concentration a (Temme's expansion)."""
    return jnp.log(concentration) + jnp.log1p(_gamma_relative_quantile(concentration, u))


def gamma_quantile_large(concentration, u):
    """The Gamma(concentration, 1) quantile at Φ(u) itself, a·(1 + μ): for very large a
    more accurate than the exponential of the log quantile, whose rounding (that of
    log a ≈ 16 at a = 1e7, 2e-6 in float32) is 0.6 % of the prior sd there."""
    return concentration * (1.0 + _gamma_relative_quantile(concentration, u))


def _polygamma_large(x):
    """(ψ(x) − log x, ψ'(x), ψ''(x), ψ'''(x), ψ''''(x)) from their asymptotic series,
    exact to float64 rounding for x >= 300 (checked against scipy)."""
    y = 1.0 / x
    y2 = y * y
    digamma_minus_log = -0.5 * y - y2 * _horner((1 / 12, 0.0, -1 / 120, 0.0, 1 / 252), y)
    trigamma = y * _horner((1.0, 0.5, 1 / 6, 0.0, -1 / 30, 0.0, 1 / 42), y)
    tetragamma = -y2 * _horner((1.0, 1.0, 0.5, 0.0, -1 / 6), y)
    pentagamma = y2 * y * _horner((2.0, 3.0, 2.0, 0.0, -1.0), y)
    hexagamma = -y2 * y2 * _horner((6.0, 12.0, 10.0, 0.0, -7.0), y)
    return digamma_minus_log, trigamma, tetragamma, pentagamma, hexagamma


def beta_logit_quantile_large(concentration1, concentration0, u):
    """logit x with x the Beta(a, b) quantile at Φ(u), for large a and b: the third-order
    Cornish–Fisher expansion of logit x = log G_a − log G_b from its exact cumulants."""
    a, b = concentration1, concentration0
    pa, pb = _polygamma_large(a), _polygamma_large(b)
    mean = jnp.log(a / b) + pa[0] - pb[0]
    variance = pa[1] + pb[1]
    sd = jnp.sqrt(variance)
    skew = (pa[2] - pb[2]) / (variance * sd)
    kurt = (pa[3] + pb[3]) / (variance * variance)
    k5 = (pa[4] - pb[4]) / (variance * variance * sd)
    z, z2 = u, u * u
    w = (
        z
        + (z2 - 1.0) * skew / 6.0
        + z * ((z2 - 3.0) * kurt / 24.0 - (2.0 * z2 - 5.0) * skew * skew / 36.0)
        + (z2 * z2 - 6.0 * z2 + 3.0) * k5 / 120.0
        - (z2 * z2 - 5.0 * z2 + 2.0) * skew * kurt / 24.0
        + (12.0 * z2 * z2 - 53.0 * z2 + 17.0) * skew**3 / 324.0
    )
    return mean + sd * w


def studentt_quantile_large(df, u):
    """The standard StudentT(df) quantile at Φ(u) for large df: the Fisher expansion
    z + g₁(z)/ν + ... + g₄(z)/ν⁴ (Hill 1970)."""
    z, z2 = u, u * u
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * _horner((3.0, 16.0, 5.0), z2) / 96.0
    g3 = z * _horner((-15.0, 17.0, 19.0, 3.0), z2) / 384.0
    g4 = z * _horner((-945.0, -1920.0, 1482.0, 776.0, 79.0), z2) / 92160.0
    y = 1.0 / df
    return z + y * (g1 + y * (g2 + y * (g3 + y * g4)))

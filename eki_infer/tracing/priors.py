"""Whitened prior transforms: u ~ N(0, I) mapped exactly onto a NumPyro prior.

Ensemble Kalman methods assume a Gaussian prior. eki_infer lets them serve any prior by
running them in *whitened* coordinates u, where the prior is N(0, I) by construction, and
pushing u through a deterministic map T with T(u) distributed exactly as the prior. For
one site with distribution ``fn``:

- ``Normal``: loc + scale · u;  ``MultivariateNormal`` / ``LowRankMultivariateNormal``:
  loc + L u with L the Cholesky factor of the covariance;  ``GaussianRandomWalk``: the
  cumulative sum of scale · u.
- univariate continuous families: x = F⁻¹(Φ(u)), always computed in its *symmetric form*:
  with p = Φ(−|u|), x = F⁻¹(p) for u ≤ 0 and x = S⁻¹(p) (the inverse survival function)
  for u > 0, and through log p = log Φ(−|u|) wherever the formula allows. The right tail
  is then as accurate as the left one (F⁻¹(Φ(u)) computed naively saturates at u ≈ 8.3 in
  float64 because Φ(u) rounds to 1).
  Closed forms: HalfNormal, Cauchy, HalfCauchy, Exponential, Laplace, Logistic, Gumbel,
  Uniform, Weibull, Levy, Gompertz, Kumaraswamy.
  Numerical inversion (:func:`_invert`: Newton steps on log F or log S, safeguarded by
  bracketing and bisection, in one ``lax.while_loop`` that freezes each element once it
  has converged; jit- and vmap-able, float32 and float64, deterministic per element):
  Gamma and Chi2 (on t = log x, with ``gammainc``/``gammaincc`` and the small-x series
  in log space), Beta and BetaProportion (on t = logit x, with our own log-space
  continued fraction :func:`_betacf` fed log x and log(1 − x), so the right tail is
  resolved where x rounds to 1), StudentT (on t = asinh z, through the same incomplete
  beta function). Started from Wilson–Hilferty / logit-normal / normal approximations,
  they take 3–6 steps and reach the accuracy of the cdf itself (~1e-13 in log p in
  float64, down to p ~ 1e-300) in the tests. In float32 the rounding error of the
  inversion grows with the shape parameter, so above a threshold (Gamma 300, Beta
  min(a, b) 1000, StudentT 1000) asymptotic expansions in 1/a replace it
  (:mod:`~eki_infer.tracing.large_parameter_quantiles`), and log B(a, b) comes from
  ``betaln``, which keeps Beta(1e5, 1) within 0.008 prior sd (a test; float32 values
  near 1 are 0.006 of its sd apart).
  NumPyro's own ``icdf`` applied to Φ(u) (clipped so it stays finite; the right tail
  saturates at u ≈ 8.3 in float64 and 5.3 in float32, beyond which lies 6e-8 of the
  prior): AsymmetricLaplace, AsymmetricLaplaceQuantile, SoftLaplace, Dagum, the
  truncated distributions (``TruncatedNormal``, ...,
  Left/Right/TwoSidedTruncatedDistribution), LowerTruncatedPowerLaw,
  DoublyTruncatedPowerLaw.
- ``Dirichlet`` (K categories): K whitened coordinates, each mapped onto an independent
  Gamma(α_k, 1) draw g_k in log space, x = g / Σ g (a softmax of log g, so small
  concentrations cannot underflow). The K coordinates carry one redundant direction
  (the overall scale of g), which the likelihood never sees; that is the price of an
  exact construction.
- wrappers: ``ExpandedDistribution`` (``.expand`` and plates) and ``Independent``
  (``.to_event``) pass u through with the full shape (parameters broadcast against it);
  ``TransformedDistribution`` (LogNormal, InverseGamma, Pareto, LogUniform, user
  transforms) maps u onto its base distribution and applies the transforms, so the
  number of whitened coordinates is the base's size (e.g. K − 1 for a stick-breaking
  transform onto a K-simplex).

All univariate maps are monotone increasing in u (bijections; a decreasing transform such
as InverseGamma = 1/Gamma is fed −u), so a unimodal posterior in constrained space stays
unimodal in u-space, which is what the Kalman updates need. The exception is a
non-bijective transform, ``FoldedDistribution``'s x ↦ |x|: the value |base(u)| is exact
but not monotone, so a posterior with mass near 0 has two mirror images in u-space (for
a folded Normal centred at 0, use HalfNormal, which is monotone).
Values are clamped to the finite floating-point range where the exact quantile is not
representable (e.g. Gamma with concentration 0.01 at u = −10).

Anything else (LKJ, Wishart, MultivariateStudentT, mixtures, ...) raises a
:class:`~eki_infer.tracing.errors.ModelTracingError` naming the site and listing the
supported families; so do discrete and improper distributions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.scipy import special as jsp
from numpyro.distributions.util import lazy_property

from eki_infer.tracing.errors import ModelTracingError
from eki_infer.tracing.large_parameter_quantiles import (
    FLOAT32_BETA_MIN,
    FLOAT32_GAMMA_MIN,
    FLOAT32_STUDENTT_MIN,
    beta_logit_quantile_large,
    gamma_log_quantile_large,
    gamma_quantile_large,
    studentt_quantile_large,
)

__all__ = [
    "SUPPORTED_PRIOR_FAMILIES",
    "beta_logit_quantile",
    "beta_quantile",
    "check_prior_parameters",
    "gamma_log_quantile",
    "prior_parameter_checks",
    "studentt_quantile",
    "whitened_shape",
    "whitened_transform",
]

# --------------------------------------------------------------------------------------
# helpers


def _float(u):
    u = jnp.asarray(u)
    return u.astype(jnp.result_type(float, u.dtype))


def _log_ndtr(x):
    """log Φ(x), accurate to rounding for all x (``jax.scipy.special.log_ndtr`` switches
    to a 3-term asymptotic series below −20 that is only good to ~4e-9 there)."""
    x = jnp.asarray(x)
    y = 1.0 / jnp.square(jnp.minimum(x, -20.0))
    series = jnp.zeros_like(x)
    for k in range(12, 0, -1):  # 1 + Σ (−1)^k (2k−1)!! y^k, by Horner
        series = -(2 * k - 1) * y * (1.0 + series)
    xa = jnp.minimum(x, -20.0)
    tail = -0.5 * xa * xa - jnp.log(-xa) - 0.5 * math.log(2.0 * math.pi) + jnp.log1p(series)
    return jnp.where(x <= -20.0, tail, jsp.log_ndtr(jnp.maximum(x, -20.0)))


def _tails(u):
    """(upper, p, log p) with p = Φ(−|u|): the symmetric form of Φ(u)."""
    a = -jnp.abs(u)
    logp = _log_ndtr(a)
    p = jnp.maximum(jsp.ndtr(a), jnp.finfo(u.dtype).tiny)
    return u > 0, p, logp


def _side(upper, lower_value, upper_value):
    return jnp.where(upper, upper_value, lower_value)


def _single_precision(x) -> bool:
    """Whether x is float32 or narrower, where the large-parameter expansions take over."""
    return jnp.finfo(x.dtype).bits <= 32


def _where_large(inversion, expansion, floor, u, *parameters):
    """``expansion(*parameters, u)`` where every parameter is at least ``floor``, else
    ``inversion``; the expansion is fed parameters held at ``floor`` elsewhere, so it
    stays finite there."""
    large = functools.reduce(jnp.logical_and, [p >= floor for p in parameters])
    floored = [jnp.maximum(p, floor) for p in parameters]
    return jnp.where(large, expansion(*floored, u), inversion)


def _clip_finite(x):
    info = jnp.finfo(x.dtype)
    return jnp.clip(x, -info.max, info.max)


# --------------------------------------------------------------------------------------
# numerical inversion


def _invert(h, t0, max_iter: int = 80):
    """Root of an increasing elementwise function, to rounding accuracy.

    ``h(t) -> (value, derivative)`` works elementwise on arrays shaped like ``t0``. One
    ``lax.while_loop`` evaluates ``h`` once per step (so ``h`` appears once in the compiled
    program): until the root is bracketed, steps go from ``t0`` towards the sign change,
    Newton steps capped at 1, 2, 4, 8, ... (a NaN value counts as beyond the root);
    then safeguarded Newton steps (``rtsafe``: bisection whenever the Newton point leaves
    the bracket or does not shrink fast enough) refine it until the step or the bracket
    is at rounding level. Each element is frozen once done, so its result never depends
    on the other elements of a batch (jit/vmap give bitwise the same values). A handful
    of steps suffice from the starting points used here; ``max_iter`` bounds the worst
    case, after which the evaluated point with the smallest residual is returned. The
    loop is not reverse-differentiable: the ensemble methods only evaluate transforms.
    """
    t0 = jnp.asarray(t0)
    dtype = t0.dtype
    eps = jnp.finfo(dtype).eps
    inf = jnp.full(t0.shape, jnp.inf, dtype)
    false = jnp.zeros(t0.shape, bool)

    def body(carry):
        k, t, lo, hi, direction, cap, dx_old, best, best_h, done = carry
        ht, dht = h(t)
        better = jnp.abs(ht) < best_h  # NaN never is
        best = jnp.where(better, t, best)
        best_h = jnp.where(better, jnp.abs(ht), best_h)
        nan = jnp.isnan(ht)
        # a NaN lies beyond the root in the direction of travel
        lo = jnp.where((ht < 0) | (nan & (direction < 0)), t, lo)
        hi = jnp.where((ht > 0) | (nan & (direction > 0)), t, hi)
        bracketed = jnp.isfinite(lo) & jnp.isfinite(hi)
        direction = jnp.where(nan, direction, jnp.where(ht < 0, 1.0, -1.0).astype(dtype))
        step = ht / dht
        t_newton = t - step
        # not yet bracketed: Newton towards the root, at most `cap`, cap doubling
        reach = jnp.where(jnp.isfinite(step), jnp.minimum(jnp.abs(step), cap), cap)
        t_search = t + direction * reach
        # bracketed: rtsafe
        scale = 1.0 + jnp.abs(t)
        noise = 64.0 * eps * scale  # rounding noise of h makes steps this size
        shrinking = (jnp.abs(2.0 * step) <= dx_old) | (jnp.abs(step) <= noise)
        ok = jnp.isfinite(t_newton) & (t_newton >= lo) & (t_newton <= hi) & shrinking
        t_refine = jnp.where(ok, t_newton, 0.5 * (lo + hi))
        t_next = jnp.where(bracketed, t_refine, t_search)
        dx = jnp.where(bracketed & ok, jnp.abs(step), 0.5 * (hi - lo))
        converged = jnp.abs(step) <= noise  # Newton would move by rounding noise only
        newton_done = converged & jnp.isfinite(t_newton) & ((bracketed & ok) | ~bracketed)
        finished = (ht == 0) | newton_done | (bracketed & (hi - lo <= noise))
        # a converged Newton step is still taken (its error is of order step²)
        t_final = jnp.where(newton_done & (ht != 0), t_newton, t)
        t_next = jnp.where(done, t, jnp.where(finished, t_final, t_next))
        cap = jnp.where(bracketed, cap, 2.0 * cap)
        return k + 1, t_next, lo, hi, direction, cap, dx, best, best_h, done | finished

    def cond(carry):
        k, *_, done = carry
        return (k < max_iter) & ~jnp.all(done)

    one = jnp.ones(t0.shape, dtype)
    init = (jnp.int32(0), t0, -inf, inf, one, one, inf, t0, inf, false)
    _, t, *_, best, _, done = lax.while_loop(cond, body, init)
    return jnp.where(done, t, best)


def _betaln(a, b):
    """log B(a, b). In float64 from three log-gammas (``jax.scipy.special.betaln`` is only
    good to ~2e-9 there for a + b >~ 20); in float32 from ``betaln``, which subtracts the
    large log-gammas' Stirling terms analytically (log Γ(1e5) − log Γ(1e5 + 1) from two
    log-gammas is off by 0.01 in float32, betaln by 1e-6)."""
    if _single_precision(jnp.asarray(a)):
        return jsp.betaln(a, b)
    return jsp.gammaln(a) + jsp.gammaln(b) - jsp.gammaln(a + b)


def _betacf(a, b, x, max_iter: int = 2000):
    """The continued fraction of I_x(a, b) (Numerical Recipes ``betacf``, modified Lentz),
    meant for x < (a+1)/(a+b+2) where it converges in O(sqrt(max(a, b))) terms.

    Written here rather than calling ``jax.scipy.special.betainc`` because that one takes
    the argument x (not log x, log(1−x)) and, for arguments near its switching point,
    runs all of its 600 iterations over the whole batch (30× slower).
    """
    info = jnp.finfo(x.dtype)
    fpmin = info.tiny / info.eps
    tol = 4.0 * info.eps

    def fix(v):
        return jnp.where(jnp.abs(v) < fpmin, fpmin, v)

    qab, qap, qam = a + b, a + 1.0, a - 1.0
    d = 1.0 / fix(1.0 - qab * x / qap)

    def body(carry):
        m, c, d, h, done = carry
        mf = m.astype(x.dtype)
        m2 = 2.0 * mf
        aa = mf * (b - mf) * x / ((qam + m2) * (a + m2))
        d1 = 1.0 / fix(1.0 + aa * d)
        c1 = fix(1.0 + aa / c)
        h1 = h * d1 * c1
        aa = -(a + mf) * (qab + mf) * x / ((a + m2) * (qap + m2))
        d2 = 1.0 / fix(1.0 + aa * d1)
        c2 = fix(1.0 + aa / c1)
        delta = d2 * c2
        h2 = h1 * delta
        keep = done
        return (
            m + 1,
            jnp.where(keep, c, c2),
            jnp.where(keep, d, d2),
            jnp.where(keep, h, h2),
            done | (jnp.abs(delta - 1.0) < tol),
        )

    def cond(carry):
        m, *_, done = carry
        return (m <= max_iter) & ~jnp.all(done)

    init = (jnp.int32(1), jnp.ones_like(x), d, d, jnp.zeros(x.shape, bool))
    return lax.while_loop(cond, body, init)[3]


def _log_betainc_pair(a, b, log_x, log_1mx, lbeta):
    """(log I_x(a, b), log I_{1−x}(b, a)) from log x and log(1−x), both accurate: the
    side whose continued fraction converges rapidly directly, the other as its
    complement (which is then not small, so no cancellation)."""
    x = jnp.exp(log_x)
    direct = x < (a + 1.0) / (a + b + 2.0)
    a_, b_ = jnp.where(direct, a, b), jnp.where(direct, b, a)
    lx, l1mx = jnp.where(direct, log_x, log_1mx), jnp.where(direct, log_1mx, log_x)
    cf = _betacf(a_, b_, jnp.exp(lx))
    log_direct = a_ * lx + b_ * l1mx - jnp.log(a_) - lbeta + jnp.log(cf)
    log_other = jnp.log1p(-jnp.exp(log_direct))
    return jnp.where(direct, log_direct, log_other), jnp.where(direct, log_other, log_direct)


def _clip_t(t):
    """Keeps a starting point inside twice the log of the floating-point range."""
    lim = 2.0 * math.log(jnp.finfo(t.dtype).max)
    return jnp.clip(t, -lim, lim)


@jax.jit
def gamma_log_quantile(concentration, u):
    """log x with x the Gamma(concentration, rate=1) quantile at Φ(u), in symmetric form.

    Solves log P(a, e^t) = log Φ(u) for u ≤ 0 and log Q(a, e^t) = log Φ(−u) for u > 0
    (P, Q: regularised lower/upper incomplete gamma functions).
    """
    u = _float(u)
    a = jnp.broadcast_to(
        jnp.asarray(concentration, u.dtype), jnp.broadcast_shapes(jnp.shape(concentration), u.shape)
    )
    u = jnp.broadcast_to(u, a.shape)
    upper, _, logp = _tails(u)
    lga = jsp.gammaln(a)

    def h(t):
        x = jnp.exp(t)
        log_lower = jnp.where(
            t < -69.0,  # x < 1e-30: P(a, x) = x^a / Γ(a+1) (1 − a x/(a+1) + ...)
            a * t - jsp.gammaln(a + 1.0) + jnp.log1p(-a * x / (a + 1.0)),
            jnp.log(jsp.gammainc(a, x)),
        )
        log_c = jnp.where(upper, jnp.log(jsp.gammaincc(a, x)), log_lower)
        value = jnp.where(upper, logp - log_c, log_c - logp)
        log_density = a * t - x - lga  # density of t = log x
        return value, jnp.exp(log_density - log_c)

    # start: Wilson-Hilferty where it is positive, else the lower-tail bound
    # P(a, x) <= x^a / Γ(a+1); for u > 0 also the upper-tail estimate -log p - log Γ(a).
    wh = a * (1.0 - 1.0 / (9.0 * a) + u / (3.0 * jnp.sqrt(a))) ** 3
    t_low = (logp + jsp.gammaln(a + 1.0)) / a
    t_wh = jnp.log(jnp.maximum(wh, jnp.finfo(u.dtype).tiny))
    x_up = jnp.maximum(-logp - lga, 1.0)
    x_up = x_up + (a - 1.0) * jnp.log(x_up)
    t0 = jnp.where(
        upper, jnp.log(jnp.maximum(jnp.maximum(wh, x_up), 1e-3)), jnp.maximum(t_wh, t_low)
    )
    t = _invert(h, _clip_t(t0))
    if _single_precision(u):
        t = _where_large(t, gamma_log_quantile_large, FLOAT32_GAMMA_MIN, u, a)
    return t


def beta_quantile(concentration1, concentration0, u):
    """The Beta(concentration1, concentration0) quantile at Φ(u), in symmetric form."""
    x = jax.nn.sigmoid(beta_logit_quantile(concentration1, concentration0, u))
    # the logit's far tails round to exactly 0 or 1 (float32: u ≈ −4 for Beta(0.1, 1)),
    # where log(x) or log(1 − x) in the model would be infinite; NumPyro's own sampler
    # stays inside (0, 1) the same way
    finfo = jnp.finfo(x.dtype)
    return jnp.clip(x, finfo.tiny, 1.0 - finfo.epsneg)


@jax.jit
def beta_logit_quantile(concentration1, concentration0, u):
    """logit of the Beta(concentration1, concentration0) quantile at Φ(u).

    Solves on t = logit x with log I_x(a, b) (u ≤ 0) or log I_{1−x}(b, a) (u > 0); in
    logit space the right tail stays resolved where x itself rounds to 1.
    """
    u = _float(u)
    shape = jnp.broadcast_shapes(jnp.shape(concentration1), jnp.shape(concentration0), u.shape)
    a = jnp.broadcast_to(jnp.asarray(concentration1, u.dtype), shape)
    b = jnp.broadcast_to(jnp.asarray(concentration0, u.dtype), shape)
    u = jnp.broadcast_to(u, shape)
    upper, _, logp = _tails(u)
    lbeta = _betaln(a, b)

    def h(t):
        log_x, log_xc = -jax.nn.softplus(-t), -jax.nn.softplus(t)
        log_lower, log_upper = _log_betainc_pair(a, b, log_x, log_xc, lbeta)
        log_c = jnp.where(upper, log_upper, log_lower)
        value = jnp.where(upper, logp - log_c, log_c - logp)
        log_density = a * log_x + b * log_xc - lbeta  # density of t = logit x
        return value, jnp.exp(log_density - log_c)

    t0 = jsp.digamma(a) - jsp.digamma(b) + u * jnp.sqrt(jsp.polygamma(1, a) + jsp.polygamma(1, b))
    t = _invert(h, _clip_t(t0))
    if _single_precision(u):
        t = _where_large(t, beta_logit_quantile_large, FLOAT32_BETA_MIN, u, a, b)
    return t


@jax.jit
def studentt_quantile(df, u):
    """The standard StudentT(df) quantile at Φ(u), by symmetry from the lower tail.

    Solves log F(z) = log Φ(−|u|) on t = asinh z, with F(−|z|) = ½ I_{wc}(ν/2, ½),
    wc = ν/(ν+z²). log wc and log(1 − wc) come from log|z| without squaring z, and the
    incomplete beta function is evaluated in log space, so even Cauchy-like tails
    (|z| ~ 1e300) are found.
    """
    u = _float(u)
    shape = jnp.broadcast_shapes(jnp.shape(df), u.shape)
    nu = jnp.broadcast_to(jnp.asarray(df, u.dtype), shape)
    u = jnp.broadcast_to(u, shape)
    upper, _, logp = _tails(u)
    half = 0.5 * nu
    log_nu = jnp.log(nu)
    lbeta = _betaln(half, 0.5)
    log_norm = jsp.gammaln(half + 0.5) - jsp.gammaln(half) - 0.5 * (log_nu + math.log(math.pi))

    def h(t):
        at = jnp.abs(t)
        log_z = at + jnp.log(-jnp.expm1(-2.0 * at)) - math.log(2.0)  # log|sinh t|
        log_w = -jax.nn.softplus(log_nu - 2.0 * log_z)
        log_wc = -jax.nn.softplus(2.0 * log_z - log_nu)
        log_g = math.log(0.5) + _log_betainc_pair(half, 0.5, log_wc, log_w, lbeta)[0]
        log_f = jnp.where(t <= 0, log_g, jnp.log1p(-jnp.exp(log_g)))
        log_density = log_norm + (half + 0.5) * log_wc
        log_cosh = at + jnp.log1p(jnp.exp(-2.0 * at)) - math.log(2.0)
        return log_f - logp, jnp.exp(log_density + log_cosh - log_f)

    t = _invert(h, jnp.arcsinh(-jnp.abs(u)))
    z = _clip_finite(jnp.sinh(t))
    z = jnp.where(upper, -z, z)
    if _single_precision(u):
        z = _where_large(z, studentt_quantile_large, FLOAT32_STUDENTT_MIN, u, nu)
    return z


# --------------------------------------------------------------------------------------
# leaf families: fn, u (already shaped like the value) -> value


def _normal(d, u):
    return d.loc + d.scale * u


def _mvn(d, u):
    return d.loc + jnp.matmul(d.scale_tril, u[..., None])[..., 0]


def _random_walk(d, u):
    return jnp.cumsum(jnp.expand_dims(d.scale, -1) * u, axis=-1)


def _half_normal(d, u):
    upper, p, logp = _tails(u)
    # upper tail: Φ(−x) = p / 2; where p / 2 is below the normal range (float32: u > 12.9,
    # where ndtri(p / 2) would be infinite) solve log Φ(−x) = log p − log 2 from x = |u|
    # with Newton steps (d/dx log Φ(−x) = −φ(x)/Φ(−x))
    far = 0.5 * p <= 64.0 * jnp.finfo(p.dtype).tiny
    x = jnp.abs(u)
    for _ in range(3):
        log_tail = _log_ndtr(-x)
        mills = jnp.exp(-0.5 * x * x - 0.5 * math.log(2.0 * math.pi) - log_tail)
        x = x + (log_tail - (logp - math.log(2.0))) / mills
    upper_value = jnp.where(far, x, -jsp.ndtri(jnp.maximum(0.5 * p, jnp.finfo(p.dtype).tiny)))
    return d.scale * _side(upper, math.sqrt(2.0) * jsp.erfinv(p), upper_value)


def _cauchy(d, u):
    upper, p, _ = _tails(u)
    c = jnp.cos(math.pi * p) / jnp.sin(math.pi * p)  # cot(πp), accurate for small p
    return d.loc + d.scale * _side(upper, -c, c)


def _half_cauchy(d, u):
    upper, p, _ = _tails(u)
    t = jnp.tan(0.5 * math.pi * p)
    return d.scale * _side(upper, t, 1.0 / t)


def _exponential(d, u):
    upper, p, logp = _tails(u)
    return _side(upper, -jnp.log1p(-p), -logp) / d.rate


def _laplace(d, u):
    upper, _, logp = _tails(u)
    e = math.log(2.0) + logp
    return d.loc + d.scale * _side(upper, e, -e)


def _logistic(d, u):
    upper, p, logp = _tails(u)
    lg = logp - jnp.log1p(-p)
    return d.loc + d.scale * _side(upper, lg, -lg)


def _gumbel(d, u):
    upper, p, logp = _tails(u)
    return d.loc - d.scale * _side(upper, jnp.log(-logp), jnp.log(-jnp.log1p(-p)))


def _uniform(d, u):
    upper, p, _ = _tails(u)
    width = d.high - d.low
    return _side(upper, d.low + p * width, d.high - p * width)


def _weibull(d, u):
    upper, p, logp = _tails(u)
    e = _side(upper, -jnp.log1p(-p), -logp)
    return d.scale * e ** (1.0 / d.concentration)


def _levy(d, u):
    upper, p, _ = _tails(u)
    lower = 1.0 / jsp.ndtri(0.5 * p) ** 2
    up = 0.5 / jsp.erfinv(p) ** 2
    return d.loc + d.scale * _side(upper, lower, up)


def _gompertz(d, u):
    upper, p, logp = _tails(u)
    e = _side(upper, -jnp.log1p(-p), -logp)
    return jnp.log1p(e / d.concentration) / d.rate


def _kumaraswamy(d, u):
    upper, p, logp = _tails(u)
    log_surv = _side(upper, jnp.log1p(-p), logp)  # log (1 − x^a)^b
    return (-jnp.expm1(log_surv / d.concentration0)) ** (1.0 / d.concentration1)


def _gamma(d, u):
    t = gamma_log_quantile(d.concentration, u)
    x = jnp.exp(t - jnp.log(d.rate))
    if _single_precision(t):  # the quantile itself, not exp of its log (see there)
        a = jnp.broadcast_to(d.concentration, t.shape)
        direct = gamma_quantile_large(jnp.maximum(a, FLOAT32_GAMMA_MIN), u) / d.rate
        x = jnp.where(a >= FLOAT32_GAMMA_MIN, direct, x)
    info = jnp.finfo(t.dtype)
    return jnp.clip(x, info.tiny, info.max)


def _beta(d, u):
    return beta_quantile(d.concentration1, d.concentration0, u)


def _studentt(d, u):
    return d.loc + d.scale * studentt_quantile(d.df, u)


def _dirichlet(d, u):
    return jax.nn.softmax(gamma_log_quantile(d.concentration, u), axis=-1)


def _by_icdf(d, u):
    q = jsp.ndtr(u)
    info = jnp.finfo(q.dtype)
    q = jnp.clip(q, info.tiny, 1.0 - info.epsneg)
    return _clip_finite(d.icdf(q))


class _StudentTByQuantile(dist.StudentT):
    """StudentT whose icdf is :func:`studentt_quantile` (NumPyro's needs
    tensorflow_probability's betaincinv), for truncated StudentT priors."""

    def icdf(self, q):
        return self.loc + self.scale * studentt_quantile(self.df, jsp.ndtri(q))


def _truncated(d, u):
    """A truncated prior through NumPyro's icdf (which maps the base's cdf range onto
    the truncation), with a StudentT base given its quantile from this module."""
    base = d.base_dist
    if type(base) is dist.StudentT:
        base = _StudentTByQuantile(base.df, base.loc, base.scale)
        bounds = {k: getattr(d, k) for k in ("low", "high") if hasattr(d, k)}
        d = type(d)(base, **bounds)
    return _by_icdf(d, u)


def _families():
    table = [
        ("Normal", _normal),
        ("MultivariateNormal", _mvn),
        ("LowRankMultivariateNormal", _mvn),
        ("GaussianRandomWalk", _random_walk),
        ("HalfNormal", _half_normal),
        ("Cauchy", _cauchy),
        ("HalfCauchy", _half_cauchy),
        ("Exponential", _exponential),
        ("Laplace", _laplace),
        ("Logistic", _logistic),
        ("Gumbel", _gumbel),
        ("Uniform", _uniform),
        ("Weibull", _weibull),
        ("Levy", _levy),
        ("Gompertz", _gompertz),
        ("Kumaraswamy", _kumaraswamy),
        ("Gamma", _gamma),  # includes Chi2
        ("Beta", _beta),  # includes BetaProportion
        ("StudentT", _studentt),
        ("Dirichlet", _dirichlet),
        ("AsymmetricLaplace", _by_icdf),
        ("AsymmetricLaplaceQuantile", _by_icdf),
        ("SoftLaplace", _by_icdf),
        ("Dagum", _by_icdf),
        ("LeftTruncatedDistribution", _truncated),
        ("RightTruncatedDistribution", _truncated),
        ("TwoSidedTruncatedDistribution", _truncated),
        ("LowerTruncatedPowerLaw", _by_icdf),
        ("DoublyTruncatedPowerLaw", _by_icdf),
    ]
    return tuple((getattr(dist, n), f) for n, f in table if hasattr(dist, n))


_LEAVES = _families()

#: Names of the prior families :func:`whitened_transform` maps exactly (besides the
#: wrappers ``.expand``, ``.to_event`` and ``TransformedDistribution``, which give
#: LogNormal, InverseGamma, Pareto, LogUniform, ... for free).
SUPPORTED_PRIOR_FAMILIES = tuple(
    sorted(
        {c.__name__ for c, _ in _LEAVES}
        | {
            "Chi2",
            "BetaProportion",
            "LogNormal",
            "InverseGamma",
            "Pareto",
            "LogUniform",
            "TruncatedNormal",
            "TransformedDistribution",
        }
    )
)


def _site(site):
    return f"latent site '{site}'" if site is not None else "this distribution"


def _family_name(fn):
    return type(fn).__name__


def _check_leaf(fn, site, top):
    # the distribution itself, and the wrapper it sits in (.expand, .to_event, plates)
    family = _family_name(fn) + ("" if fn is top else f" in {_family_name(top)}")
    if isinstance(fn, dist.ImproperUniform):
        raise ModelTracingError(
            f"{_site(site)} has an improper prior ({family}): the ensemble "
            "methods draw their initial ensemble from the prior, so it must be a proper "
            "distribution. Give the site a proper prior (e.g. a wide Normal or Uniform).",
            site,
        )
    if getattr(fn.support, "is_discrete", False):
        raise ModelTracingError(
            f"{_site(site)} is discrete ({family}): ensemble Kalman methods "
            "need continuous latent variables. Marginalise the discrete variable out of "
            "the model or make it continuous.",
            site,
        )
    for cls, f in _LEAVES:
        if isinstance(fn, cls):
            return f
    inner = "" if fn is top else f" (inside {_family_name(top)})"
    raise ModelTracingError(
        f"{_site(site)} has prior {_family_name(fn)}{inner}, which has no exact whitened "
        "transform yet. Supported prior families: "
        + ", ".join(SUPPORTED_PRIOR_FAMILIES)
        + " (each also with .expand, .to_event and inside plates).",
        site,
    )


#: distributions whose ``low``/``high`` may be infinite (one-sided truncation)
_TRUNCATIONS = (
    dist.LeftTruncatedDistribution,
    dist.RightTruncatedDistribution,
    dist.TwoSidedTruncatedDistribution,
)


def _parameter_leaves(fn):
    """The distributions whose parameters define ``fn``: its family under .expand,
    .to_event and transforms, and a truncation's base."""
    leaf = fn
    while isinstance(
        leaf, dist.ExpandedDistribution | dist.Independent | dist.TransformedDistribution
    ):
        leaf = leaf.base_dist
    yield leaf
    if isinstance(leaf, _TRUNCATIONS):
        yield leaf.base_dist


def _parameters(leaf, lazy: bool = True):
    """(name, value, constraint) of each parameter ``leaf`` holds; with ``lazy=False``
    only those already computed (not a lazy property such as a MultivariateNormal's
    precision matrix, which reading would compute). A 'dependent' constraint (Uniform's
    bounds: see :func:`_support_bounds`) has nothing to check on its own."""
    for name, constraint in getattr(leaf, "arg_constraints", {}).items():
        if not lazy and _is_lazy(leaf, name):
            continue
        value = getattr(leaf, name, None)
        if value is not None:
            yield name, value, constraint


def _is_lazy(leaf, name) -> bool:
    return isinstance(getattr(type(leaf), name, None), lazy_property) and name not in vars(leaf)


def _support_bounds(leaf):
    """(lower, upper) of a support that is an interval between two parameters (Uniform,
    a two-sided truncation), else None: such a prior exists only where lower < upper."""
    lower = getattr(leaf.support, "lower_bound", None)
    upper = getattr(leaf.support, "upper_bound", None)
    if lower is None or upper is None:
        return None
    return lower, upper


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_prior_parameters(fn, site=None) -> None:
    """Refuses a prior whose parameters, where they are known when the model is traced
    (constants, not functions of other latents), are NaN or infinite, or outside their
    constraints (a negative scale, Uniform(1, 0)), naming the site and the parameter:
    Normal(0, inf) or Uniform(0, inf) is an improper prior, and its whitened transform
    would give NaN or the edge of the floating-point range. A truncation bound may be
    infinite. Parameters computed from other latents are checked member by member when
    the model runs (:func:`prior_parameter_checks`)."""

    def refuse(leaf, what, why):
        family = _family_name(leaf) + ("" if leaf is fn else f" in {_family_name(fn)}")
        raise ModelTracingError(
            f"{_site(site)} has prior {family} with {what}: {why} Give it parameters "
            "inside their ranges, e.g. a wide Normal or Uniform.",
            site,
        )

    for leaf in _parameter_leaves(fn):
        for name, value, constraint in _parameters(leaf):
            if _is_traced(value):
                continue
            value = np.asarray(value)
            infinite_allowed = isinstance(leaf, _TRUNCATIONS) and name in ("low", "high")
            if np.issubdtype(value.dtype, np.floating):
                bad = np.isnan(value) if infinite_allowed else ~np.isfinite(value)
                if bad.any():
                    refuse(
                        leaf,
                        f"{name} = {value[bad].ravel()[0]}",
                        "a prior must be a proper distribution with finite parameters (an "
                        "infinite scale or bound is an improper prior, which the ensemble "
                        "cannot be drawn from).",
                    )
            if infinite_allowed or dist.constraints.is_dependent(constraint):
                continue
            with jax.ensure_compile_time_eval():  # concrete, also inside make_jaxpr
                inside = np.asarray(constraint.check(jnp.asarray(value)))
            if not inside.all():
                # the first element outside (where the check is elementwise), else all
                shown = (
                    value.ravel()[np.argmin(inside.ravel())]
                    if inside.shape == value.shape
                    else value
                )
                refuse(leaf, f"{name} = {shown}", f"{name} must satisfy {constraint}.")
        bounds = _support_bounds(leaf)
        if bounds is None or any(_is_traced(b) for b in bounds):
            continue
        lower, upper = (np.asarray(b) for b in bounds)
        if not np.all(lower < upper):
            refuse(
                leaf,
                f"lower bound {lower.ravel()[0]} not below its upper bound {upper.ravel()[0]}",
                "the interval it is defined on is empty.",
            )


def prior_parameter_checks(fn) -> list[tuple[str, jax.Array]]:
    """``(what, ok)`` for each parameter of ``fn``, ``ok`` a scalar bool array that is
    False where the parameter, as the model computes it, is outside its range: NaN, not
    finite (a truncation bound may be infinite), outside its constraint, or an interval
    support's bounds out of order. One entry per parameter whether it is a constant or
    computed from latents, so the list depends on the model's structure alone.

    A hierarchical prior such as th ~ Uniform(lo, 1) or HalfNormal(s), with lo and s drawn
    from priors that reach past 1 or below 0, is undefined for some ensemble members;
    NumPyro gives such a member a NaN log density, so NUTS never goes there. The tracer
    makes those members fail instead (their values and forward outputs become NaN), so
    the ensemble methods redraw or reject them rather than using a value outside the
    prior's support; a check that fails at every point the tracer probes is an error
    naming the site. Of the matrix constraints only a Cholesky factor's is checked (a
    lower-triangular matrix with a positive diagonal, O(d²)); a covariance or precision
    matrix is only checked to be finite, its positive definiteness left to the
    transform's Cholesky factor, which is NaN where it fails."""
    checks = []
    for leaf in _parameter_leaves(fn):
        family = _family_name(leaf) + ("" if leaf is fn else f" in {_family_name(fn)}")
        for name, value, constraint in _parameters(leaf, lazy=False):
            value = jnp.asarray(value)
            if not jnp.issubdtype(value.dtype, jnp.inexact):
                continue  # integer or boolean parameters: nothing to be NaN
            if isinstance(leaf, _TRUNCATIONS) and name in ("low", "high"):
                ok, what = jnp.all(~jnp.isnan(value)), "must not be NaN"
            else:
                ok, what = jnp.all(jnp.isfinite(value)), "must be finite"
                matrix = getattr(constraint, "event_dim", 0) >= 2
                checked = not dist.constraints.is_dependent(constraint) and (
                    not matrix or isinstance(constraint, type(dist.constraints.lower_cholesky))
                )
                if checked:
                    ok = ok & jnp.all(constraint.check(value))
                    what += f" and satisfy {constraint}"
            checks.append((f"{family}'s {name} {what}", ok))
        bounds = _support_bounds(leaf)
        if bounds is not None:
            lower, upper = (jnp.asarray(b) for b in bounds)
            checks.append(
                (f"{family}'s lower bound must be below its upper", jnp.all(lower < upper))
            )
    return checks


def _walk_shape(fn, shape, site, top):
    if isinstance(fn, dist.MaskedDistribution):
        raise ModelTracingError(
            f"{_site(site)} is masked (handlers.mask / obs_mask): masked sites are not "
            "supported; drop the masked entries from the model instead.",
            site,
        )
    if isinstance(fn, dist.ExpandedDistribution | dist.Independent):
        return _walk_shape(fn.base_dist, shape, site, top)
    if isinstance(fn, dist.TransformedDistribution):
        for t in reversed(fn.transforms):
            shape = t.inverse_shape(shape)
        return _walk_shape(fn.base_dist, shape, site, top)
    _check_leaf(fn, site, top)
    return tuple(shape)


def whitened_shape(fn, site=None) -> tuple[int, ...]:
    """Shape of the whitened coordinates that :func:`whitened_transform` takes for ``fn``.

    Equal to ``fn.shape()`` except under a shape-changing ``TransformedDistribution``.
    Raises :class:`ModelTracingError` (naming ``site``) for unsupported distributions.
    """
    if getattr(fn.support, "is_discrete", False) or isinstance(fn, dist.ImproperUniform):
        leaf = fn  # the family under .expand/.to_event wrappers, for the message
        while isinstance(leaf, dist.ExpandedDistribution | dist.Independent):
            leaf = leaf.base_dist
        _check_leaf(leaf, site, fn)
    return _walk_shape(fn, tuple(fn.shape()), site, fn)


def _apply(fn, u, site, top):
    if isinstance(fn, dist.ExpandedDistribution | dist.Independent):
        return _apply(fn.base_dist, u, site, top)
    if isinstance(fn, dist.TransformedDistribution):
        x = _apply(fn.base_dist, u * _orientation(fn), site, top)
        for t in fn.transforms:
            x = t(x)
        return x
    return _check_leaf(fn, site, top)(fn, u)


def _orientation(fn):
    """+1 or −1 (per element) so that a univariate TransformedDistribution stays increasing
    in u: a decreasing transform (InverseGamma = 1/Gamma) gets its base fed with −u, which
    is again N(0, I). Non-bijective or multivariate transforms keep u as it is."""
    if fn.base_dist.event_shape or any(t.domain.event_dim for t in fn.transforms):
        return 1.0
    sign = 1.0
    for t in fn.transforms:
        try:
            sign = sign * t.sign
        except NotImplementedError:
            return 1.0
    return sign


def whitened_transform(fn, u, site=None):
    """Maps whitened ``u`` (any shape with ``prod(whitened_shape(fn))`` elements) onto a
    value of ``fn``: if u ~ N(0, I) then the value is distributed exactly as ``fn``."""
    shape = whitened_shape(fn, site)
    u = _float(u).reshape(shape)
    value = _apply(fn, u, site, fn)
    if jnp.issubdtype(value.dtype, jnp.floating):
        value = _clip_finite(value)
    return jnp.broadcast_to(value, fn.shape())

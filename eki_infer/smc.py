"""Tempered sequential Monte Carlo with Kalman-informed moves (derivative-free).

The target path is the one EKI walks, made exact. In whitened space the prior is
N(0, I_d), and at temperature t ∈ [0, 1]

    π_t(u) ∝ N(u; 0, I) exp(−t Φ(u)),     Φ(u) = ½ ‖Γ^{-1/2}(y − G(u))‖².

A population of N particles per chain starts from the prior and goes through stages;
each stage

1. **chooses Δt**. ``schedule="ess"`` (default): by bisection (on log Δt) so that the
   effective sample size of the incremental weights exp(−Δt Φ_i) is ``ess_target``
   (0.3) times the ESS at Δt → 0⁺ (the latter discounts particles whose forward map
   failed, Φ = +∞). With equal weights after every resampling this is also the
   conditional ESS. ``schedule="dmc"``: the data-misfit controller of Iglesias & Yang
   (2021), the EKI engine's default (:class:`~eki_infer.schedulers.DataMisfitController`),
   from the equally weighted population's finite misfits:
   Δt = min(max(M/(2⟨Φ⟩), sqrt(M/(2 Var Φ))), 1 − t), M the data dimension
   (:func:`dmc_dt`). Either way the last step is capped so that t ends at exactly 1.

   **Kalman transport** (waste-free, ``transport=True``, default): when that step stops
   short of 1, the sampler also tries to go to t = 1 at once. The population is moved by
   the affine map that carries its mean and covariance onto the ensemble-Kalman update
   to t = 1 (:mod:`eki_infer.kalman_transport`; cross-fitted: the even chains' states are
   moved by the map fitted to the odd chains' and vice versa) and weighted exactly,
   w_i = π̃_1(T u_i) |det A| / π̃_t(u_i). The map is first probed on the chains' last
   states (N / P forward runs); if the probe's ESS fraction reaches ``transport_ess``
   (0.8), the other particles are moved too (N − N / P runs), and if the whole
   population's ESS fraction reaches it as well, the stage goes to t = 1 with these
   weights instead of taking the ordinary step (its ``dt`` is 1 − t,
   ``history.transported`` 1). For a linear forward map the map is the exact posterior
   update up to the Monte-Carlo error of the moments, so the prior goes to the posterior
   in one stage; where the map is nonlinear the probe's ESS
   (``history.transport_probe_ess``) is low and the probe's N / P runs are the cost.
   The bar is high because one transport replaces several stages and its weights can
   only judge the particles it produced, not the regions its Gaussian map leaves out
   (see the measurements below).
   With several chains the transport's batches run the forward map on every chain's
   particles when any chain needs them (one vmapped call, as the moves do); each
   active chain counts them in ``forward_evaluations``, and ``forward_runs`` counts
   every run made.
2. **reweights and accumulates the evidence**: log Z += log Σ_i W_i exp(−Δt Φ_i);
3. **resamples** systematically;
4. **moves** particles with Metropolis–Hastings kernels that leave π_t invariant.
   ``waste_free=True`` (default; Dau & Chopin 2022, "On the waste-free sequential Monte
   Carlo", JRSS B 84): only M = N / P of the N particles are resampled (P =
   ``chain_length``, 10), each starts a Markov chain, the chains run P − 1 moves, and
   all M · P states are the next population. A stage then costs N − M evaluations,
   whatever the mixing, and no move's output is thrown away. ``waste_free=False``
   (resample-move): all N are resampled and every particle is moved until the
   decorrelation criterion below holds.
   The population's statistics (mean μ, covariance C + εI with Cholesky factor L, the
   cross-covariance C^{uG} of parameters and outputs, and a t component per separated
   group of particles) are computed once after resampling and kept fixed during the
   stage, so each proposal is a fixed kernel. Each particle picks, independently of its
   state, one of three proposals (a mixture of π_t-reversible kernels is
   π_t-reversible); their probabilities are adapted after each move to their shares of
   the expected squared jump distance (ESJD, in L-coordinates; :func:`move`):

   (a) *random walk* with the population covariance: u' = u + s L ξ, symmetric, so the
       MH ratio is π_t(u')/π_t(u). The scale s is adapted after every move towards an
       acceptance of ``rw_acceptance`` (0.25).

   (b) *Kalman proposal*: the ensemble-Kalman (statistically linearised) estimate of the
       posterior mean seen from u,

           m(u) = u + δ(u),   δ(u) = t C^{uG} Γ^{-1} (y − G(u)) − C u,

       is the information-form Kalman update of u (it uses only forward outputs: C^{uG}
       stands in for C ∇Gᵀ). For linear G, C^{uG} = C Aᵀ and with C = C_t (the exact
       covariance of π_t) m(u) is the exact posterior mean m_t for every u. The proposal
       is the Crank–Nicolson move around it,

           u' = u + (1 − ρ) δ(u) + κ L ξ,   κ = sqrt(1 − ρ²),  ξ ~ N(0, I_d),

       i.e. q(u'|u) = N(u'; u + (1 − ρ) δ(u), κ² C). C is regularised to be
       positive definite, so q has a density in both directions, and the reverse needs
       only G(u'), which the move evaluates anyway:

           log α = log π_t(u') − log π_t(u) + log q(u|u') − log q(u'|u),
           log q(a|b) = −‖L^{-1}(a − b − (1 − ρ) δ(b))‖² / (2κ²) + const

       (the normalising constants are equal and cancel). For a linear-Gaussian π_t and
       C = C_t, q is exactly π_t-reversible (an AR(1) around m_t), so the acceptance is
       1 for every ρ and κ = 1 is an independent draw from the posterior. Elsewhere κ is
       adapted towards an acceptance of ``kalman_acceptance`` (0.3).

   Resample-move only: moves repeat until every active chain has decorrelated from
   its resampled positions: the largest rank correlation, over the coordinates of
   L^{-1}(u − μ), between the particles' positions at the start of the stage and now is
   below
   max(``corr_threshold`` (0.2), 3/√N) (the second term: the noise floor of a sample
   correlation), with at least ``min_moves`` (1) and at most ``max_moves`` (10) moves.

   (c) *independence proposal*: a draw from a multivariate t (10 degrees of freedom)
       fitted to the population, u' = μ_k + L_k ξ sqrt(10 / χ²₁₀), with MH ratio
       π_t(u') q(u) / (π_t(u) q(u')). When the population falls into two separated
       groups (:mod:`eki_infer.population_groups`: the best-separated 2-means split,
       Ashman's D ≥ 3, each group at least d + 2 particles) q is a mixture of one t per
       group, weighted by the groups' shares, so it proposes where the particles are
       and moves them between the groups as easily as within them; otherwise it is one
       t with the population's mean and covariance. Where the population describes π_t
       well it gives nearly independent draws; where it does not (a curved ridge) its
       acceptance is low, and below ``independent_acceptance`` (0.2) its ESJD does not
       count, so it keeps only a floor of 0.02 of the moves.

5. **at t = 1 (waste-free)** the M chains run on, every state kept, until the
   population's effective sample size reaches ``final_ess`` (0.8 N) or stops growing.
   :func:`chain_ess` estimates it from the spread of the chain means, for every
   coordinate of L^{-1}(u − μ) and its square (the smallest counts): M Var(all states) /
   Var(chain means), i.e. the variance of the population mean expressed as a number of
   independent draws. The chains start from a resampled population, so they are as
   good as independent draws from π_1 at their start, apart from duplicated ancestors
   (which lower the estimate). Chains in separate modes that no proposal crosses never
   mix, so there the ESS levels off near M, and chains in a region the proposals barely
   leave (the neck of a funnel) hold it down too; the extension also stops when the ESS
   grew by less than 25 % while the chains doubled in length (then the regions' weights
   are those the reweightings set, and the run warns that the target was missed), and
   after ``max_final_moves`` (200). The
   extension is the history's last row (dt = 0), and the result holds M × (P + extra
   moves) draws per chain.

Every move evaluates the forward map once for all particles of all chains in one jitted,
vmapped call (so black-box simulators and executors see one batch per move). The jitted
steps are cached per model structure, with the model's array arguments as jit arguments,
so a second run on new data of the same shapes does not recompile. A particle
whose output is non-finite gets Φ = +∞: weight zero when reweighting, a rejected
proposal when moving. Fewer than two particles with finite Φ in a chain raises
:class:`SMCError` naming the stage.

The log evidence returned is log p(y) = log Z − ½ log det(2πΓ), with log Z the sum of the
stages' log mean incremental weights. For kernels fixed independently of the particles it
is an unbiased estimate of Z (its log biased downwards by about Var/2), and for
independent particles Var(log Z) ≈ Σ_k (1/ESS_k − 1)/N, ESS_k the stage's ESS fraction
(``history.ess``). Take that as a lower bound. A waste-free population's states are
correlated (its worth in independent draws is ``history.sample_ess``, often 15-50 % of
N), and the moves' statistics come from the population they move. Measured by
``benchmarks/smc_dimension.py`` (the reference linear-Gaussian model, M = 200, 8 chains;
error mean ± standard error, and the chains' sd against the formula's):

- d = 5, N = 1000: within 0.01 (the transport takes it to t = 1 in one stage); with
  ``transport=False`` −0.07 ± 0.05, sd 0.13 as the formula says;
- d = 20: N = 1000 +0.06 ± 0.17, sd 0.48 against 0.15; N = 2000 −0.03 ± 0.10, sd 0.29
  against 0.10;
- d = 30: N = 1000 +0.04 ± 0.43, sd 1.23 against 0.17; N = 3000 −0.37 ± 0.10, sd 0.29
  against 0.10;
- d = 50: N = 1000 −12.7 ± 2.6, with means off by up to 1.6 posterior sds and sds by
  31 %; N = 5000 −0.22 ± 0.17, means within 0.04 sd and sds within 3 %.

So beyond d ≈ 10 the formula understates the spread three- to sevenfold: judge the evidence
by the spread of several chains (``log_evidence_per_chain``). In scratch runs on other
linear-Gaussian problems the error was biased (+1.7 ± 0.4 at d = 30, N = 1000); moves
built from independent exact draws of π_t instead of the population gave −0.3 ± 0.2
there, which locates the error in the population's own statistics. Cross-fitting them
(the even chains moved with the odd chains' statistics and vice versa, as the transport
is) removes that dependence, but statistics from half the population are noisier and
the moves mixed worse (−2.8 ± 2.0 and means off by up to 1.35 sd), so it was not adopted.

Hence the default particle count grows with d (:func:`default_num_particles`: 100 per
dimension beyond d = 10), and a run whose stage populations fall below 10 d effective
draws warns (resample-move, which records no such estimate: fewer than 10 d particles).

Defaults, and what the measurements behind them say
---------------------------------------------------
Measured with ``benchmarks/smc_accuracy.py`` (default and ``--resample-move``) and
``benchmarks/smc_schedule_study.py`` (results in ``benchmarks/results/smc_accuracy.md``,
``smc_accuracy_resample_move.md`` and ``smc_schedule_study.md``): six reference models,
1000 particles, one chain, data seeds 0-2 (the study: × 3 SMC keys), against
closed-form, quadrature or long-NUTS references; cost in forward evaluations against
NUTS's gradient evaluations at 1000 warmup + 1000 draws.

- ``waste_free=True``, ``chain_length`` 10, ``final_ess`` 0.8 N
  (``benchmarks/smc_waste_free_study.py``, ``smc_waste_free_study.md``; every variant
  there has the transport and the independence proposal unless it says otherwise).
  Against resample-move with the same keys and schedule, waste-free SMC needed
  0.28-0.62 × the evaluations (28,867 vs 54,333 summed over the five models other than
  exp_sine; exp_sine 7,200 vs 12,333), at most 0.82 × NUTS's gradients on any seed where
  resample-move went up to 1.30 ×, and both met 0.1 sd / 10 % on every seed of all five.
  A stage of either variant is limited by its ESS step, not by its moves; waste-free SMC
  pays N − M evaluations per stage instead of N per move. The sequential rounds are
  16-104 per run (resample-move: 9-18), over 100 × fewer than NUTS's 11,000-52,000.
  ``chain_length`` 5 and 20 met all five too (26,333 and 29,400 evaluations), but 5
  missed on 1 of 12 lorenz96 runs over the 4 further keys (mean error 0.114).
  ``final_ess`` 0.5 N saved 18 % of the evaluations but left darcy and sir at 0.106 and
  0.105 sd; N cost 11 % more.
- ``p_independent`` adapted (the independence proposal; same study, and
  ``benchmarks/smc_key_robustness.py``, which reruns every model and seed with 4 more
  SMC keys). Without it the five models need 35,000 evaluations instead of 28,867,
  eight_schools 0.50 × NUTS on average instead of 0.28, and lorenz96's data seed 2, whose
  posterior is split between two separated regions, met the target with none of the 4
  keys (means up to 0.18 sd, sds up to 25 % off) instead of all 4: the chains at t = 1
  cannot even out the two regions' masses without a proposal that crosses between them.
- ``transport=True``, ``transport_ess`` 0.8 (same study). Without the transport the five
  models need 30,833 evaluations (28,867 with it), linear_gaussian 6,167 instead of
  3,367 (0.56 × NUTS on its worst seed instead of 0.31), and the linear_gaussian
  log-evidence errors are +0.116, −0.252, +0.023 instead of −0.009, −0.002, +0.004. It
  takes linear_gaussian from the prior to t = 1 in one stage; on sir, lorenz96 and
  eight_schools its probes cost more than it saves (6,400, 7,667 and 5,567 evaluations
  with it; 5,833, 7,467 and 5,467 without). At ``transport_ess`` 0.5 the
  five models met the target with 27,633 evaluations; an earlier version without the
  independence proposal took a transport on exp_sine's seed 1 at an ESS of 0.51 there,
  and the main mode's sd came out 27 % off (8 % at 0.8), so the bar stays at 0.8.
- ``ess_target`` 0.3. For resample-move it was lowered from 0.5 (with ``corr_threshold``
  0.2 from 0.1): 1.5-1.9 × fewer evaluations for about the same rms errors, at 1.4 ×
  the log-evidence error (rms 0.123 vs 0.087 on linear_gaussian, resample-move). For
  waste-free SMC, 0.1 met all five models with 14 % fewer evaluations (24,900), but over
  4 more SMC keys per seed (``smc_key_robustness.py --candidates``,
  ``smc_key_robustness_candidates.md``) it missed the target on 1 of 12 lorenz96 runs
  and 3 of 12 eight_schools runs, where the defaults missed none.
- ``schedule="ess"`` (``benchmarks/smc_schedule_study.py``, resample-move, 3 keys per
  seed). On the five models other than exp_sine the data-misfit controller takes 3-4
  stages where the ESS rule takes 2-5, 0.84-1.32 × the evaluations and gives about the
  same errors, but it does not see the weights: its first linear_gaussian stages left
  ESS fractions of 5-10 % (rms log-evidence error 0.353 vs 0.123). On exp_sine, whose
  prior-predictive misfits span many orders of magnitude, it started with Δt ≈ 5e-13
  and needed 14.3 stages and 3.2 × the evaluations (summed over the six models: 90,111
  vs 65,667 evaluations).
- ``num_particles`` 1000 (for d ≤ 10; 100 d beyond, see the log evidence above): at
  1000 particles (and a final ESS of 800) the Monte-Carlo error alone brings the worst
  parameter of the worst seed close to 0.1 sd. For a guaranteed 0.1 sd use more
  particles or several chains; the cost grows in proportion.
- Known limitation, exp_sine: the posterior has a mirror mode (amplitude < 0) of
  0.7-2.3 % of the mass. SMC lost it on all three seeds (resample-move: 0.20, 0 and 0 %
  against 0.90, 2.27 and 0.70 %), so the whole posterior's amplitude sd is off by up to
  0.305 (resample-move 0.295), while the main mode is accurate (means within 0.022 sd,
  sds within 5.6 %). ``benchmarks/smc_mirror_mode.py`` follows the mirror mass stage by
  stage (data seed 1, 8 keys) and, for each stage, the mirror's share of the weights its
  reweighting gives the previous stage's particles. Applied to exact draws of π_t the
  moves keep each mode's share (``tests/test_smc.py``), but the population is not made
  of exact draws: the second stage (t ≈ 0.01 → 0.08) reweights the 10-34 particles on the
  mirror side (as placed by the first stage's moves) to 0.65-3.5 % of the weight (exact
  1.9 %; without the independence proposal 0.04-2.6 %), its moves then carry part of
  them to the main mode (1.09 % after them, mean of 8 keys). A waste-free stage restarts
  N/P = 100 Markov chains from resampled particles, so the mirror side gets one or two,
  and their states stay near A = 0, where the mirror's arm of the posterior meets the
  main mode's (mean amplitude -0.23 after the second stage, while π_t's mirror mass is
  centred at -0.52 and moves out to -0.79 by the third stage's t ≈ 0.49). The third
  stage's reweighting then gives them 0.33 % of the weight (exact 2.04 %), and by t = 1
  the mirror is empty on all 8 keys (without the independence proposal 0.62 %, 0-5.0 %).
  Resample-move, which moves every particle, leaves them nearer the mirror's mass (-0.43
  after the second stage; -0.46 with random-walk moves only), and with random-walk moves
  only it keeps the mass on average (2.31 % at t = 1), but the 8 runs range over
  0.2-6.3 %, while 1000 independent exact draws get the amplitude sd within 10 % in
  91.5-94.5 % of sets (median error 0.04): every reweighting of so few particles adds
  spread. Neither a finer schedule (``ess_target`` 0.85: 0 % on all 8 keys) nor 3000
  particles (0.92 % on average, 0-2.3 %) keeps it. Keeping a 1-2 % mode to 10 % would
  take many more particles on its side or moves that find a mode the population has
  lost. Three further remedies were tried in runs kept out of ``benchmarks/`` and not
  adopted. A mode-jumping move (Tjelmeland & Hegstad 2001: an affine involution between
  the components of a Gaussian mixture fitted to each stage's population, with its exact
  MH ratio) failed because by the time the modes separate the mirror holds too few
  particles to form a component, and once it is empty no jump leads back. Resampling
  stratified by groups of particles (each group kept at a minimum share of the
  offspring, its mass carried in the weights) did not keep it either: the mirror
  separates from the main mode only after the second stage's reweighting has set its
  weight, and groups found earlier (k-means) kept particles on that side but away from
  the mode. A random walk whose covariance is that of each particle's nearest neighbours
  in the stage's population (k from 10 to 150, the reverse move's covariance in its MH
  ratio), run with random-walk moves only on 4 keys, did no better than the population's
  covariance. NUTS (one chain, 1000 draws) had no mirror draws on any of the three seeds
  either. 3000 exact draws miss the sd target in at most 1 set of 200 per seed, so the
  miss is the sampler's. Also tried and not kept: independence-proposal group weights ∝ share^0.5
  (more proposals for a small group: the mirror survived on 3 of 8 keys, on two with
  about its mass, but ``smc_key_robustness.py`` then met exp_sine on 1 of 12 runs and eight schools
  on 9 of 12 instead of 12), and a path from a widened start, N(u; 0, I/β) e^(−tΦ) with β
  from 0.25 to 1 (10 of 24 runs met the target in a random-walk sandbox). Given both
  modes (t components with the exact modes' moments), 60 extension moves set the mirror
  mass within −33 % to +19 %: what is missing is a way to find a mode whose mass lies in
  the prior's far tail. Neither a Kalman proposal with a local gain (a kernel-weighted
  regression of outputs on parameters around each particle: 1.25 % on average without the
  independence proposal, against 0.63 % with the global gain) nor resampling ordered along
  the population's leading principal axis (Gerber, Chopin & Whiteley 2019; defaults: kept
  on 1 of 8 keys) met the sd target on any key with the defaults (README, "Misses").
"""

from __future__ import annotations

import inspect
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp

from eki_infer.kalman_transport import (
    apply_cross_fitted,
    cross_fitted_maps,
    regularised_cholesky,
    transport_log_weights,
)
from eki_infer.keys import RESERVED_KEY_INDEX, chain_keys, fold_keys
from eki_infer.model_args import split_model_args, with_model_args
from eki_infer.population_groups import split_groups
from eki_infer.user_warnings import warn
from eki_infer.validation import check_count, check_flag, check_number

__all__ = [
    "SCHEDULES",
    "TUNING_OPTIONS",
    "MoveStats",
    "SMCError",
    "SMCHistory",
    "SMCResult",
    "SMCState",
    "check_options",
    "choose_dt",
    "default_num_particles",
    "dmc_dt",
    "effective_options",
    "ess_of_log_weights",
    "init",
    "kalman_proposal",
    "move",
    "move_stats",
    "pooled_log_evidence",
    "predictive_noise_draws",
    "reweight_and_resample",
    "run_smc",
    "systematic_resample",
]


#: Tempering schedules of :func:`run_smc`: effective sample size or data-misfit controller.
SCHEDULES = ("ess", "dmc")


class SMCError(RuntimeError):
    """Too few particles with finite forward output to continue."""


class SMCState(NamedTuple):
    """One chain's population. Shapes: N particles, d parameters, M outputs.

    Attributes:
        particles: u, ``(N, d)`` in whitened space.
        outputs: G(u), ``(N, M)`` (non-finite rows: failed forward runs).
        misfit: Φ(u), ``(N,)``, +∞ where the forward map failed.
        log_weights: normalised log weights ``(N,)`` (−log N after resampling).
        t: the temperature reached.
        log_z: log of the estimate of E_prior[exp(−t Φ)] so far.
        rw_scale: the random-walk scale s (adapted).
        kalman_step: κ = sqrt(1 − ρ²) of the Kalman proposal (adapted, in (0, 1]).
        p_kalman: the probability that a particle uses the Kalman proposal (adapted).
        p_independent: the probability that it uses the independence proposal (adapted;
            the random walk gets the rest). None only in checkpoints written before this
            proposal existed.
    """

    particles: jax.Array
    outputs: jax.Array
    misfit: jax.Array
    log_weights: jax.Array
    t: jax.Array
    log_z: jax.Array
    rw_scale: jax.Array
    kalman_step: jax.Array
    p_kalman: jax.Array
    p_independent: jax.Array | None = None


class MoveStats(NamedTuple):
    """Population statistics fixed during a stage's moves.

    Attributes:
        mean: μ, ``(d,)``.
        cov: C + εI, ``(d, d)``.
        chol: its lower Cholesky factor L.
        chol_inv: L^{-1}, so that every per-particle whitening is a matrix product
            (see :func:`move_stats` for why no triangular solve runs per move).
        cross: C^{uG} Γ^{-1/2}ᵀ, ``(d, M)``: the covariance of u and the whitened outputs.
        start: the resampled particles in L-coordinates, L^{-1}(u − μ), ``(N, d)``, for
            the decorrelation criterion.
        mix_mean, mix_chol, mix_chol_inv: ``(2, d)``, ``(2, d, d)``, ``(2, d, d)``: the
            centres and scale factors of the independence proposal's two t components,
            fitted to the two separated groups of the population
            (:mod:`eki_infer.population_groups`), or both the whole population's.
        mix_log_weight: ``(2,)``: log of each component's weight (its group's share of
            the particles; −∞ for the second when there is one group).
    """

    mean: jax.Array
    cov: jax.Array
    chol: jax.Array
    chol_inv: jax.Array
    cross: jax.Array
    start: jax.Array
    mix_mean: jax.Array
    mix_chol: jax.Array
    mix_chol_inv: jax.Array
    mix_log_weight: jax.Array


class SMCHistory(NamedTuple):
    """Per-stage record; every field has shape (num_chains, num_stages).

    Stage k reweights from ``t − dt`` to ``t``, resamples and moves. ``ess`` is the
    effective sample size (fraction of N) of the reweighted population before
    resampling; ``moves`` the number of MH moves; ``acceptance_rw``,
    ``acceptance_kalman`` and ``acceptance_independent`` the mean acceptance of each
    proposal over the stage's moves; ``rw_scale``, ``kalman_step``, ``p_kalman`` and
    ``p_independent`` the adapted proposal parameters at
    the stage's end; ``correlation`` the decorrelation criterion after the last move
    (waste-free: of the chains' last states with their starting points); ``sample_ess``
    the population's effective sample size after the stage (:func:`chain_ess`;
    waste-free only, NaN otherwise); ``transport_probe_ess`` the ESS fraction of the Kalman
    transport's probe (NaN when it was not tried) and ``transported`` 1 where the stage
    went to t = 1 by the transport (then ``ess`` is the transported population's ESS
    fraction); ``misfit_mean`` and ``misfit_sd`` the mean and sd of Φ over the final population
    (finite values); ``num_failed`` the number of the stage's forward runs whose output
    or misfit was not finite: its moves' proposals, its Kalman transport's probe and
    transported particles, and for the first stage also the prior draws;
    ``log_evidence`` the running log p(y) estimate; ``forward_evaluations`` (cumulative,
    per chain) and ``wall_time`` (cumulative seconds, shared). Chains that reached t = 1
    before the others repeat their last row with dt = 0 and moves = 0, and NaN
    acceptances, correlation and sample ESS (the batch's moves of other chains were not
    theirs). Waste-free runs
    end with one more row, dt = 0: the extension of the chains at t = 1 (``moves`` its
    extra moves, ``sample_ess`` the final population's ESS).
    """

    t: np.ndarray
    dt: np.ndarray
    ess: np.ndarray
    moves: np.ndarray
    acceptance_rw: np.ndarray
    acceptance_kalman: np.ndarray
    acceptance_independent: np.ndarray
    rw_scale: np.ndarray
    kalman_step: np.ndarray
    p_kalman: np.ndarray
    p_independent: np.ndarray
    correlation: np.ndarray
    sample_ess: np.ndarray
    transport_probe_ess: np.ndarray
    transported: np.ndarray
    misfit_mean: np.ndarray
    misfit_sd: np.ndarray
    num_failed: np.ndarray
    log_evidence: np.ndarray
    forward_evaluations: np.ndarray
    wall_time: np.ndarray


class SMCResult(NamedTuple):
    """What :func:`run_smc` returns; arrays have a leading chain axis.

    Attributes:
        particles: final equally weighted particles ``(chains, draws, d)``: N for
            resample-move; for waste-free SMC every state of the M chains at t = 1,
            M × L ≥ N (L = P + extra moves), chain by chain: draws i·L, ..., i·L + L − 1
            are Markov chain i's states in order (so autocorrelation-based ESS estimates,
            such as ArviZ's, see their correlation).
        outputs: their forward outputs ``(chains, draws, M)``.
        initial_particles: the prior draws the run started from ``(chains, N, d)``.
        log_evidence: log p(y) estimates ``(chains,)``; NaN for a chain that stopped
            before t = 1 (max_stages). :func:`pooled_log_evidence` combines them.
        history: :class:`SMCHistory`.
        forward_evaluations: per chain ``(chains,)``: the forward runs each chain needed.
        forward_runs: the forward runs made, all chains together: every batch runs the
            forward map for every chain's particles (one vmapped call), also for chains
            that are already at t = 1 or need no transport, so with several chains this
            can exceed the sum of ``forward_evaluations``.
        sequential_rounds: batched forward calls that had to wait for each other
            (1 initial + the total number of moves + the Kalman transport's batches).
        state: the final :class:`SMCState` (chain axis first).
    """

    particles: np.ndarray
    outputs: np.ndarray
    initial_particles: np.ndarray
    log_evidence: np.ndarray
    history: SMCHistory
    forward_evaluations: np.ndarray
    forward_runs: int
    sequential_rounds: int
    state: SMCState


# --------------------------------------------------------------------------- pieces


def _misfit(outputs, observations, noise):
    """Φ per row; +∞ where the output is not finite."""
    ok = jnp.all(jnp.isfinite(outputs), axis=-1)
    residual = jnp.where(ok[:, None], observations - outputs, 0.0)
    phi = noise.misfit(residual)
    return jnp.where(ok & jnp.isfinite(phi), phi, jnp.inf)


def init(rng_key, num_particles: int, dim: int, forward, observations, noise) -> SMCState:
    """Prior draws and their forward outputs (``forward``: (N, d) -> (N, M))."""
    u = jax.random.normal(rng_key, (num_particles, dim))
    g = forward(u)
    phi = _misfit(g, observations, noise)
    n = num_particles
    return SMCState(
        particles=u,
        outputs=g,
        misfit=phi,
        log_weights=jnp.full((n,), -math.log(n), dtype=u.dtype),
        t=jnp.zeros((), u.dtype),
        log_z=jnp.zeros((), u.dtype),
        rw_scale=jnp.asarray(2.38 / math.sqrt(dim), u.dtype),
        kalman_step=jnp.asarray(0.5, u.dtype),
        p_kalman=jnp.asarray(0.5, u.dtype),
        p_independent=jnp.asarray(0.1, u.dtype),
    )


def ess_of_log_weights(log_w):
    """(Σw)² / Σw² for unnormalised log weights (0 when all are −∞)."""
    a = 2.0 * logsumexp(log_w) - logsumexp(2.0 * log_w)
    return jnp.where(jnp.isfinite(a), jnp.exp(a), 0.0)


def _increment(log_weights, misfit, dt):
    return log_weights + jnp.where(jnp.isfinite(misfit), -dt * misfit, -jnp.inf)


#: The smallest step choose_dt tries is tiny ** _DT_FLOOR_EXPONENT · (1 − t), tiny the
#: dtype's smallest normal number (:func:`choose_dt`, :func:`_step_floor_collapse`).
_DT_FLOOR_EXPONENT = 0.9


def choose_dt(log_weights, misfit, t, ess_target: float, iterations: int = 60):
    """The step Δt ∈ (0, 1 − t] at which the ESS of W_i exp(−Δt Φ_i) equals
    ``ess_target`` times its limit as Δt → 0⁺; 1 − t if the ESS stays above that.

    Bisection on log Δt over [log(1 − t) + 0.9 log(tiny), log(1 − t)], tiny the dtype's
    smallest normal number (Δt down to about 1e-277 · (1 − t) in float64, 1e-34 in
    float32), so that misfits spread over hundreds of orders of magnitude (1e23 at the
    prior of a problem with noise 1e-12) still get a step that keeps the target ESS.
    """
    remaining = jnp.maximum(1.0 - t, 0.0)
    ess0 = ess_of_log_weights(jnp.where(jnp.isfinite(misfit), log_weights, -jnp.inf))
    target = ess_target * ess0

    def ess(dt):
        return ess_of_log_weights(_increment(log_weights, misfit, dt))

    tiny = jnp.finfo(remaining.dtype).tiny
    hi = jnp.log(jnp.maximum(remaining, tiny))
    lo = hi + _DT_FLOOR_EXPONENT * jnp.log(tiny)

    def body(_, bounds):
        a, b = bounds
        mid = 0.5 * (a + b)
        ok = ess(jnp.exp(mid)) >= target
        return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

    a, _ = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    dt = jnp.where(ess(remaining) >= target, remaining, jnp.exp(a))
    return jnp.where(remaining > 0, dt, 0.0)


def dmc_dt(misfit, t, data_dim: int):
    """The data-misfit controller's step (Iglesias & Yang 2021; ALGORITHMS.md §2), from an
    equally weighted population's misfits: over the finite Φ_i (n of them),

        q = max(M / (2⟨Φ⟩), sqrt(M / (2 Var Φ))),   Var with 1/(n − 1),
        Δt = min(q, 1 − t),

    M the data dimension. An infinite q (all Φ equal, or all zero) takes the whole
    remaining step, where the weights are all equal anyway; a NaN q (fewer than two finite
    Φ, which the driver has already turned into an :class:`SMCError`) also falls back to
    1 − t, never to NaN.
    """
    remaining = jnp.maximum(1.0 - t, 0.0)
    ok = jnp.isfinite(misfit)
    n = jnp.sum(ok).astype(remaining.dtype)
    phi = jnp.where(ok, misfit, 0.0)
    mean = jnp.sum(phi) / n
    var = jnp.sum(jnp.where(ok, (phi - mean) ** 2, 0.0)) / (n - 1.0)
    q = jnp.maximum(data_dim / (2.0 * mean), jnp.sqrt(data_dim / (2.0 * var)))
    q = jnp.where(jnp.isnan(q) | (q <= 0), remaining, q)
    return jnp.where(remaining > 0, jnp.minimum(q, remaining), 0.0)


def systematic_resample(rng_key, log_weights):
    """Indices (N,) by systematic resampling of normalised ``log_weights``."""
    n = log_weights.shape[0]
    w = jnp.exp(log_weights - logsumexp(log_weights))
    cdf = jnp.cumsum(w)
    positions = (jnp.arange(n) + jax.random.uniform(rng_key, dtype=w.dtype)) / n
    return jnp.minimum(jnp.searchsorted(cdf, positions * cdf[-1]), n - 1)


def reweight_and_resample(rng_key, state: SMCState, ess_target: float, schedule: str = "ess"):
    """Steps the temperature (Δt by :func:`choose_dt` for ``schedule="ess"``, by
    :func:`dmc_dt` for ``"dmc"``), reweights, updates log Z and resamples. Returns
    ``(state, dt, ess_fraction, num_finite)``; a chain at t = 1 is returned unchanged
    with dt = 0."""
    n = state.misfit.shape[0]
    if schedule == "dmc":
        # the population is equally weighted here (after init or the last resampling)
        dt = dmc_dt(state.misfit, state.t, state.outputs.shape[-1])
    else:
        dt = choose_dt(state.log_weights, state.misfit, state.t, ess_target)
    log_w = _increment(state.log_weights, state.misfit, dt)
    increment = logsumexp(log_w)  # weights were normalised: log Σ W_i e^{-Δt Φ_i}
    ess = ess_of_log_weights(log_w) / n
    num_finite = jnp.sum(jnp.isfinite(log_w))
    idx = systematic_resample(rng_key, log_w)
    moved = dt > 0
    new = state._replace(
        particles=state.particles[idx],
        outputs=state.outputs[idx],
        misfit=state.misfit[idx],
        log_weights=jnp.full((n,), -math.log(n), dtype=log_w.dtype),
        t=jnp.where(state.t + dt >= 1.0 - 1e-12, 1.0, state.t + dt),
        log_z=state.log_z + increment,
    )
    state = jax.tree.map(lambda a, b: jnp.where(moved, a, b), new, state)
    return state, dt, ess, num_finite


def transport_and_resample(
    rng_key, state: SMCState, moved, moved_outputs, log_det, observations, noise
):
    """The population moved by a Kalman transport (:mod:`eki_infer.kalman_transport`) to
    t = 1: weighted by w_i = π̃_1(T u_i) |det A| / π̃_t(u_i), log Z updated by log Σ W_i w_i,
    and resampled systematically. Returns ``(state, ess_fraction, num_finite)``."""
    n = state.misfit.shape[0]
    phi = _misfit(moved_outputs, observations, noise)
    log_w = state.log_weights + transport_log_weights(
        state.particles, state.misfit, state.t, moved, phi, log_det
    )
    ess = ess_of_log_weights(log_w) / n
    idx = systematic_resample(rng_key, log_w)
    new = state._replace(
        particles=moved[idx],
        outputs=moved_outputs[idx],
        misfit=phi[idx],
        log_weights=jnp.full((n,), -math.log(n), dtype=log_w.dtype),
        t=jnp.ones_like(state.t),
        log_z=state.log_z + logsumexp(log_w),
    )
    return new, ess, jnp.sum(jnp.isfinite(log_w))


def move_stats(state: SMCState, observations, noise, jitter: float = 1e-6) -> MoveStats:
    """Mean, regularised covariance (C + ε I, ε = max(jitter, 16 d ε_machine) · tr C / d:
    :func:`~eki_infer.kalman_transport.regularised_covariance`), its Cholesky factor and
    inverse factor, and the whitened cross-covariance, over finite particles (1/n).

    L^{-1} is formed once here (d × d) so that the moves whiten particles with matrix
    products. Besides being cheaper, this keeps LAPACK out of the moves: on jaxlib's
    CPU backend (0.10.x) a chain-batched triangular solve large enough to be split over
    the intra-op thread pool waits for its pieces on that pool, and two such solves
    running side by side (independent ops in one jitted move) can occupy every pool
    thread and never return (seen on 2-core machines). The driver calls this function
    once per chain (``lax.map``), so its own factorisations are never batched either.
    """
    u, g = state.particles, state.outputs
    ok = jnp.isfinite(state.misfit)
    n = jnp.maximum(jnp.sum(ok), 1)
    w = ok / n
    mean = w @ u
    du = jnp.where(ok[:, None], u - mean, 0.0)
    gw = noise.whiten(jnp.where(ok[:, None], g - observations, 0.0))
    gbar = w @ gw
    dg = jnp.where(ok[:, None], gw - gbar, 0.0)
    d = u.shape[1]
    cov, chol = regularised_cholesky(du.T @ du / n, jitter)
    chol_inv = solve_triangular(chol, jnp.eye(d, dtype=u.dtype), lower=True)
    cross = du.T @ dg / n
    start = (u - mean) @ chol_inv.T
    second = split_groups(u, ok)

    def component(mask):
        size = jnp.maximum(jnp.sum(mask), 1)
        centre = jnp.sum(jnp.where(mask[:, None], u, 0.0), 0) / size
        dev = jnp.where(mask[:, None], u - centre, 0.0)
        _, factor = regularised_cholesky(dev.T @ dev / size, jitter)
        inverse = solve_triangular(factor, jnp.eye(d, dtype=u.dtype), lower=True)
        return centre, factor, inverse, jnp.log(jnp.sum(mask) / n)

    split = jnp.any(second)
    first = component(ok & ~second)
    other = component(second)
    whole = (mean, chol, chol_inv, jnp.zeros((), u.dtype))
    first = jax.tree.map(lambda a, b: jnp.where(split, a, b), first, whole)
    other = jax.tree.map(lambda a, b: jnp.where(split, a, b), other, whole)
    other = (*other[:3], jnp.where(split, other[3], -jnp.inf))
    mix = [jnp.stack([a, b]) for a, b in zip(first, other, strict=True)]
    return MoveStats(mean, cov, chol, chol_inv, cross, start, *mix)


def _drift(u, residual_w, t, stats: MoveStats):
    """δ(u) = t C^{uG} Γ^{-1}(y − G(u)) − C u, rows; ``residual_w`` = Γ^{-1/2}(y − G)."""
    return t * residual_w @ stats.cross.T - u @ stats.cov.T


def kalman_proposal(u, residual_w, t, stats: MoveStats, kappa, xi):
    """u' = u + (1 − ρ) δ(u) + κ L ξ with ρ = sqrt(1 − κ²) (rows)."""
    rho = jnp.sqrt(jnp.maximum(1.0 - kappa**2, 0.0))
    return u + (1.0 - rho) * _drift(u, residual_w, t, stats) + kappa * xi @ stats.chol.T


def _kalman_log_q(to, frm, residual_w_frm, t, stats, kappa):
    """log q(to | frm) up to a constant shared by both directions."""
    rho = jnp.sqrt(jnp.maximum(1.0 - kappa**2, 0.0))
    centre = frm + (1.0 - rho) * _drift(frm, residual_w_frm, t, stats)
    z = (to - centre) @ stats.chol_inv.T
    return -0.5 * jnp.sum(z**2, axis=-1) / kappa**2


def _whitened_residual(outputs, observations, noise):
    ok = jnp.all(jnp.isfinite(outputs), axis=-1)
    return noise.whiten(jnp.where(ok[:, None], observations - outputs, 0.0))


#: Smallest adapted probabilities of the random walk, the Kalman and the independence
#: proposal (each stays in the mix, so its acceptance keeps being measured).
_FLOORS = (0.1, 0.1, 0.02)


def _independent_log_q(v, stats: MoveStats, nu: float):
    """log of the independence proposal's density at rows ``v``, up to a constant: the
    mixture of multivariate t components with ν degrees of freedom (``stats.mix_*``)."""
    z = jnp.einsum("kij,nkj->nki", stats.mix_chol_inv, v[:, None, :] - stats.mix_mean[None])
    log_t = -0.5 * (nu + v.shape[-1]) * jnp.log1p(jnp.sum(z**2, axis=-1) / nu)
    log_det = jnp.sum(jnp.log(jnp.diagonal(stats.mix_chol, axis1=-2, axis2=-1)), axis=-1)
    return logsumexp(stats.mix_log_weight - log_det + log_t, axis=-1)


def move(
    rng_key,
    state: SMCState,
    stats: MoveStats,
    forward,
    observations,
    noise,
    *,
    p_kalman: float | None = None,
    p_independent: float | None = None,
    rw_acceptance: float = 0.25,
    kalman_acceptance: float = 0.3,
    independent_acceptance: float = 0.2,
    independent_dof: float = 10.0,
):
    """One MH move of every particle targeting π_t (t = ``state.t``), then adaptation
    of the proposal parameters. Returns ``(state, info)`` with info = (acceptance of the
    random walk, of the Kalman proposal and of the independence proposal, number of
    failed proposals, decorrelation criterion).

    Each particle picks one of three proposals, independently of its state (a mixture of
    π_t-reversible kernels is π_t-reversible whatever the probabilities): the Kalman
    proposal with probability ``p_kalman``, the independence proposal with
    ``p_independent``, else the random walk. The independence proposal draws from the
    multivariate t (``independent_dof`` degrees of freedom) fitted to the population,
    u' = μ + L ξ sqrt(ν / χ²_ν), with MH ratio π_t(u') q(u) / (π_t(u) q(u')); where the
    population describes π_t well it gives nearly independent draws.

    Either probability may be fixed, or None (default) to adapt it after each move from
    the proposals' expected squared jump distances per proposal (in L-coordinates), ESJD:
    each adapted probability becomes its proposal's share of the summed ESJD (the
    independence proposal's counts only while its acceptance is at least
    ``independent_acceptance``: below that it stays at a floor of 0.02, so that one
    rarely accepted jump does not decide the mixture), with floors of 0.1 for the Kalman
    proposal and the random walk. With one probability fixed the other two proposals
    share the rest by their ESJD; ``p_independent=0`` gives the random walk and Kalman
    mixture alone.
    """
    k_choice, k_xi, k_accept, k_chi, k_comp = jax.random.split(rng_key, 5)
    u, t = state.particles, state.t
    n, d = u.shape
    dtype = u.dtype
    p_kal = state.p_kalman if p_kalman is None else jnp.asarray(p_kalman, dtype)
    p_ind = state.p_independent if p_independent is None else jnp.asarray(p_independent, dtype)
    p_ind = jnp.minimum(p_ind, 1.0 - p_kal)
    pick = jax.random.uniform(k_choice, (n,), dtype)
    use_kalman = pick < p_kal
    use_ind = ~use_kalman & (pick < p_kal + p_ind)
    use_rw = ~use_kalman & ~use_ind
    xi = jax.random.normal(k_xi, (n, d), dtype)
    res = _whitened_residual(state.outputs, observations, noise)
    kappa = state.kalman_step
    u_kal = kalman_proposal(u, res, t, stats, kappa, xi)
    u_rw = u + state.rw_scale * xi @ stats.chol.T
    nu = independent_dof
    radial = jnp.sqrt(nu / jax.random.chisquare(k_chi, nu, (n,), dtype))
    comp = jax.random.categorical(k_comp, stats.mix_log_weight, shape=(n,))
    # both components' draws on every row (2 n d numbers), then each row's own: no
    # per-row gather of a d × d factor
    scaled = jnp.einsum("cij,nj->cni", stats.mix_chol, xi)
    second = comp[:, None] == 1
    u_ind = stats.mix_mean[comp] + radial[:, None] * jnp.where(second, scaled[1], scaled[0])
    proposal = jnp.where(use_kalman[:, None], u_kal, jnp.where(use_ind[:, None], u_ind, u_rw))

    g_new = forward(proposal)
    phi_new = _misfit(g_new, observations, noise)
    failed = ~jnp.isfinite(phi_new)
    res_new = _whitened_residual(g_new, observations, noise)

    def log_target(v, phi):
        return -0.5 * jnp.sum(v**2, axis=-1) - t * phi

    log_alpha = log_target(proposal, phi_new) - log_target(u, state.misfit)
    kalman_correction = _kalman_log_q(u, proposal, res_new, t, stats, kappa) - _kalman_log_q(
        proposal, u, res, t, stats, kappa
    )
    ind_correction = _independent_log_q(u, stats, nu) - _independent_log_q(proposal, stats, nu)
    log_alpha = log_alpha + jnp.where(
        use_kalman, kalman_correction, jnp.where(use_ind, ind_correction, 0.0)
    )
    log_alpha = jnp.where(failed | ~jnp.isfinite(log_alpha), -jnp.inf, log_alpha)
    accept = jnp.log(jax.random.uniform(k_accept, (n,))) < log_alpha
    alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))

    def mean_over(mask, x):
        return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    acc_rw = mean_over(use_rw, alpha)
    acc_kal = mean_over(use_kalman, alpha)
    acc_ind = mean_over(use_ind, alpha)
    jump = jnp.sum(((proposal - u) @ stats.chol_inv.T) ** 2, axis=-1)
    esjd_rw = mean_over(use_rw, alpha * jump)
    esjd_kal = mean_over(use_kalman, alpha * jump)
    esjd_ind = jnp.where(acc_ind >= independent_acceptance, mean_over(use_ind, alpha * jump), 0.0)
    # adapt only from moves in which every proposal being weighed was used
    seen = jnp.sum(use_rw) > 0
    if p_kalman is None:
        seen = seen & (jnp.sum(use_kalman) > 0)
    if p_independent is None:
        seen = seen & (jnp.sum(use_ind) > 0)
    new_kal, new_ind = p_kal, p_ind
    if p_kalman is None and p_independent is None:
        esjd = jnp.stack([esjd_rw, esjd_kal, esjd_ind])
        probs = jnp.maximum(esjd / jnp.maximum(jnp.sum(esjd), 1e-300), jnp.asarray(_FLOORS))
        new_kal, new_ind = probs[1] / jnp.sum(probs), probs[2] / jnp.sum(probs)
    elif p_kalman is None:  # the Kalman proposal and the random walk share 1 − p_independent
        share = esjd_kal / jnp.maximum(esjd_kal + esjd_rw, 1e-300)
        new_kal = (1.0 - p_ind) * jnp.clip(share, _FLOORS[1], 1.0 - _FLOORS[0])
    elif p_independent is None:  # the independence proposal and the random walk share the rest
        share = esjd_ind / jnp.maximum(esjd_ind + esjd_rw, 1e-300)
        new_ind = (1.0 - p_kal) * jnp.clip(share, _FLOORS[2], 1.0 - _FLOORS[0])
    ok = seen & jnp.isfinite(new_kal) & jnp.isfinite(new_ind)
    new_kal = jnp.where(ok, new_kal, p_kal)
    new_ind = jnp.where(ok, new_ind, p_ind)
    new_u = jnp.where(accept[:, None], proposal, u)
    new_state = state._replace(
        particles=new_u,
        outputs=jnp.where(accept[:, None], g_new, state.outputs),
        misfit=jnp.where(accept, phi_new, state.misfit),
        rw_scale=jnp.where(
            jnp.sum(use_rw) > 0,
            jnp.clip(state.rw_scale * jnp.exp(2.0 * (acc_rw - rw_acceptance)), 1e-3, 10.0),
            state.rw_scale,
        ),
        kalman_step=jnp.where(
            jnp.sum(use_kalman) > 0,
            jnp.clip(kappa * jnp.exp(2.0 * (acc_kal - kalman_acceptance)), 0.02, 1.0),
            kappa,
        ),
        p_kalman=new_kal,
        p_independent=new_ind,
    )
    z = (new_u - stats.mean) @ stats.chol_inv.T
    corr = _max_abs_correlation(stats.start, z)
    return new_state, (acc_rw, acc_kal, acc_ind, jnp.sum(failed), corr)


def _ranks(x):
    return jnp.argsort(jnp.argsort(x, axis=0), axis=0).astype(x.dtype)


def _max_abs_correlation(a, b):
    """Largest |rank correlation(a[:, j], b[:, j])| over columns j (Spearman: a few
    particles stuck in a distant minor mode do not dominate it)."""
    a, b = _ranks(a), _ranks(b)
    da, db = a - a.mean(0), b - b.mean(0)
    num = jnp.sum(da * db, axis=0)
    den = jnp.sqrt(jnp.sum(da**2, axis=0) * jnp.sum(db**2, axis=0))
    return jnp.max(jnp.where(den > 0, jnp.abs(num) / jnp.where(den > 0, den, 1.0), 0.0))


# --------------------------------------------------------------------------- driver


# Compiled steps of the last few problem structures: a second run on new data of the same
# shapes (or with another key or chain count) reuses them instead of recompiling.
_COMPILED: dict = {}
_CACHE_SIZE = 4


def _compiled_steps(problem, options):
    """``(steps, data)``: the jitted steps for ``problem``'s structure and ``options``, and
    the dynamic array arguments (data, covariates, observations) to call them with.

    As in :mod:`eki_infer.steps`, array leaves of the model's arguments are jit
    arguments and everything else is static and part of the cache key, together with
    the model function itself (held by the key, so it cannot be confused with another
    model of the same sites). A problem whose ``forward`` was replaced on the instance
    is compiled for this run only."""
    data, signature, rebuild = split_model_args(problem.model_args, problem.model_kwargs)
    if "forward" in vars(problem):  # a forward map set on this instance: use it as is
        return _compile(problem, None, options), data
    key = None
    if signature is not None:
        key = (
            problem.model,
            signature,
            repr(problem),
            tuple(sorted(options.items())),
            problem.model_fingerprint,
        )
        if key in _COMPILED:
            return _COMPILED[key], data
    steps = _compile(problem, rebuild, options)
    if key is not None:
        while len(_COMPILED) >= _CACHE_SIZE:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = steps
    return steps, data


def _compile(problem, rebuild, options):
    """Jitted chain-vmapped steps for one problem structure; the model's array
    arguments (``data``), the observations and the noise are arguments, not constants
    (``rebuild`` None: ``problem.forward`` is used as it is)."""

    def forward_rows(data):
        if rebuild is None:
            return problem.forward
        return with_model_args(problem, rebuild, data).forward

    def init_chains(keys, n, data, observations, noise):
        forward = forward_rows(data)
        return jax.vmap(lambda k: init(k, n, problem.dim, forward, observations, noise))(keys)

    def population_stats(states, observations, noise):
        # One chain at a time: no chain-batched LAPACK call (see move_stats).
        return jax.lax.map(lambda s: move_stats(s, observations, noise, options["jitter"]), states)

    def stage_start(keys, states, active, observations, noise):
        new, dt, ess, finite = jax.vmap(
            lambda k, s: reweight_and_resample(k, s, options["ess_target"], options["schedule"])
        )(keys, states)
        new = _keep_inactive(new, states, active)
        return new, population_stats(new, observations, noise), dt, ess, finite

    def move_chains(keys, states, stats, active, data, observations, noise):
        kw = {
            "p_kalman": options["p_kalman"],
            "p_independent": options["p_independent"],
            "rw_acceptance": options["rw_acceptance"],
            "kalman_acceptance": options["kalman_acceptance"],
        }
        forward = forward_rows(data)
        new, info = jax.vmap(lambda k, s, st: move(k, s, st, forward, observations, noise, **kw))(
            keys, states, stats
        )
        new = _keep_inactive(new, states, active)
        return new, info

    def select_heads(keys, states, stats, chain_length):
        # Rows r, r + P, r + 2P, ... of a systematic resample of N are a systematic
        # resample of N / P (r uniform on {0, ..., P − 1}): the chains' starting points.
        n = states.misfit.shape[-1]
        offsets = jax.vmap(lambda k: jax.random.randint(k, (), 0, chain_length))(keys)
        rows = offsets[:, None] + chain_length * jnp.arange(n // chain_length)[None, :]
        heads = jax.vmap(_take_rows)(states, rows)
        return heads, _with_start(stats, heads)

    def transport_rows(states, maps, rows, folds, data):
        """Rows ``rows`` of every chain moved by the other fold's map, and their outputs."""
        u = states.particles[:, rows]
        moved, log_det = jax.vmap(apply_cross_fitted, in_axes=(0, 0, None))(maps, u, folds[rows])
        return moved, jax.vmap(forward_rows(data))(moved), log_det

    def transport_probe(states, rows, folds, data, observations, noise):
        # One chain at a time for the factorisations (see move_stats).
        maps = jax.lax.map(
            lambda s: cross_fitted_maps(
                s.particles, s.outputs, s.misfit, s.t, observations, noise, folds, options["jitter"]
            ),
            states,
        )
        moved, outputs, log_det = transport_rows(states, maps, rows, folds, data)
        u = states.particles[:, rows]
        phi = jax.vmap(lambda g: _misfit(g, observations, noise))(outputs)
        log_w = jax.vmap(transport_log_weights)(
            u, states.misfit[:, rows], states.t, moved, phi, log_det
        )
        ess = jax.vmap(ess_of_log_weights)(log_w) / rows.shape[0]
        return maps, (moved, outputs, log_det), ess, jnp.sum(~jnp.isfinite(phi), axis=1)

    def transport_finish(keys, states, maps, probe, rows, folds, data, y, noise):
        # the rows before the probe (the probe is the population's last block)
        rest = transport_rows(states, maps, rows, folds, data)
        phi = jax.vmap(lambda g: _misfit(g, y, noise))(rest[1])
        rest_failed = jnp.sum(~jnp.isfinite(phi), axis=1)
        moved, outputs, log_det = (
            jnp.concatenate([a, b], axis=1) for a, b in zip(rest, probe, strict=True)
        )
        new, ess, finite = jax.vmap(
            lambda k, s, m, g, ld: transport_and_resample(k, s, m, g, ld, y, noise)
        )(keys, states, moved, outputs, log_det)
        return new, population_stats(new, y, noise), ess, finite, rest_failed

    return (
        jax.jit(init_chains, static_argnums=1),
        jax.jit(stage_start),
        jax.jit(move_chains),
        jax.jit(select_heads, static_argnums=3),
        jax.jit(population_stats),
        jax.jit(transport_probe),
        jax.jit(transport_finish),
    )


def _take_rows(state: SMCState, rows) -> SMCState:
    """The particles ``rows`` of one chain's population (scalars kept)."""
    return state._replace(
        particles=state.particles[rows],
        outputs=state.outputs[rows],
        misfit=state.misfit[rows],
        log_weights=jnp.full(rows.shape, -math.log(rows.shape[0]), state.log_weights.dtype),
    )


def _stack_blocks(blocks: list, like: SMCState) -> SMCState:
    """The population made of every chain state of a waste-free stage: ``blocks`` are
    the chains' states after 0, 1, ..., P − 1 moves (each ``(chains, M, ...)``); block
    b's row i is chain i's b-th state, so the population's row b·M + i."""
    last = blocks[-1]
    particles = jnp.concatenate([b.particles for b in blocks], axis=1)
    n = particles.shape[1]
    return last._replace(
        particles=particles,
        outputs=jnp.concatenate([b.outputs for b in blocks], axis=1),
        misfit=jnp.concatenate([b.misfit for b in blocks], axis=1),
        log_weights=jnp.full(particles.shape[:2], -math.log(n), like.log_weights.dtype),
    )


def _keep_inactive(new, old, active):
    """Chains that are not ``active`` keep their old population (or statistics): any
    pytree with the chain axis first."""
    active = jnp.asarray(active)
    return jax.tree.map(
        lambda a, b: jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
    )


def chain_ess(particles, num_chains_per_population: int, stats: MoveStats) -> np.ndarray:
    """Effective sample size of a waste-free population, per SMC chain (run).

    ``particles`` ``(runs, P·M, d)`` hold M Markov chains of length P (row b·M + i is
    chain i's b-th state). For every coordinate of z = L^{-1}(u − μ) and of z² (so both
    means and variances count), the ESS is M · Var(all states) / Var(chain means): the
    variance of the population mean is Var(chain means) / M when the M chains are
    independent, and this is that variance expressed as a number of independent draws.
    No asymptotics in the chain length are involved. Chains that share an ancestor
    (resampling duplicates) are correlated, which inflates Var(chain means): the
    estimate errs low. Returns the smallest over the 2d features.
    """
    u = np.asarray(particles)
    runs, n, d = u.shape
    m = num_chains_per_population
    z = np.einsum("cnd,ced->cne", u - np.asarray(stats.mean)[:, None], np.asarray(stats.chol_inv))
    feats = np.concatenate([z, z**2], axis=-1).reshape(runs, n // m, m, 2 * d)
    total = feats.reshape(runs, n, 2 * d).var(axis=1)
    between = feats.mean(axis=1).var(axis=1, ddof=1)
    ess = m * total / np.maximum(between, 1e-300)
    return np.minimum(ess.min(axis=-1), n)


#: The keyword arguments of :func:`run_smc` that tune the algorithm (``smc_options`` of
#: :class:`~eki_infer.EKIInference`); ``max_stages``, ``progress_bar`` and
#: ``checkpoint`` come from the engine's own options.
TUNING_OPTIONS = (
    "schedule",
    "ess_target",
    "waste_free",
    "chain_length",
    "final_ess",
    "max_final_moves",
    "transport",
    "transport_ess",
    "p_kalman",
    "p_independent",
    "min_moves",
    "max_moves",
    "corr_threshold",
    "rw_acceptance",
    "kalman_acceptance",
    "jitter",
)


#: Tuning options that only one variant of the algorithm reads, with the settings that
#: variant needs: giving one a value other than its default for another variant raises
#: instead of being ignored.
_APPLIES_TO = {
    "chain_length": {"waste_free": True},
    "final_ess": {"waste_free": True},
    "max_final_moves": {"waste_free": True},
    "transport": {"waste_free": True},
    "transport_ess": {"waste_free": True, "transport": True},
    "min_moves": {"waste_free": False},
    "max_moves": {"waste_free": False},
    "corr_threshold": {"waste_free": False},
    "ess_target": {"schedule": "ess"},
}


def check_options(
    num_particles: int | None,
    num_chains: int = 1,
    max_stages: int = 200,
    *,
    names: dict | None = None,
    given=None,
    **options,
) -> None:
    """Raises ``ValueError`` naming the option for any bad :func:`run_smc` tuning option
    (unset ones take their defaults), an unknown one, or one set for a variant that does
    not read it (e.g. ``chain_length`` with ``waste_free=False``), and ``TypeError`` for a
    flag that is not a bool, so that a run fails before it compiles anything and an engine
    can check its options when it is built. Counts must be integers (bools are not), the
    other options numbers. ``num_particles`` None: the default, chosen later
    (:func:`default_num_particles`). ``names`` renames ``num_particles``, ``num_chains``
    and ``max_stages`` in the messages (an engine's own names for them). ``given``: the
    names the caller set explicitly (an engine's ``smc_options``), each refused where its
    variant does not read it; None (:func:`run_smc`, whose keywords always arrive with a
    value) refuses only values other than the default, as a default is indistinguishable
    from an option left out."""
    names = {"num_particles": "num_particles", **(names or {})}
    unknown = sorted(set(options) - set(TUNING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown SMC options {unknown}; the options are {list(TUNING_OPTIONS)}.")
    defaults = {name: _DEFAULTS[name] for name in TUNING_OPTIONS}
    o = defaults | options
    for name in ("waste_free", "transport"):
        check_flag(name, o[name])
    counts = {"num_chains": num_chains, "max_stages": max_stages}
    if num_particles is not None:
        counts["num_particles"] = num_particles
    for name, value in counts.items():
        bound = RESERVED_KEY_INDEX - 1 if name == "max_stages" else None
        check_count(names.get(name, name), value, maximum=bound)
    for name in ("chain_length", "min_moves", "max_moves"):  # moves 1 ... chain_length − 1
        check_count(name, o[name], maximum=_HEADS if name == "chain_length" else _HEADS - 1)
    check_count("max_final_moves", o["max_final_moves"], minimum=0, maximum=_HEADS - 1)
    if num_particles is not None and num_particles < 2:
        raise ValueError(f"{names['num_particles']} must be at least 2, got {num_particles}.")
    if o["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {o['schedule']!r}.")
    for name in ("ess_target", "rw_acceptance", "kalman_acceptance", "corr_threshold"):
        check_number(name, o[name], positive=True)
        if not o[name] < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {o[name]}.")
    for name in ("p_kalman", "p_independent"):
        if o[name] is not None:
            check_number(name, o[name], positive=False)
            if not o[name] <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None (adapted), got {o[name]}.")
    if o["p_kalman"] is not None and o["p_independent"] is not None:
        if o["p_kalman"] + o["p_independent"] > 1.0:
            raise ValueError(
                "p_kalman + p_independent must not exceed 1 (the random walk takes the rest), "
                f"got {o['p_kalman']} + {o['p_independent']}."
            )
    check_number("jitter", o["jitter"], positive=True)
    check_number("transport_ess", o["transport_ess"], positive=True)
    if not o["transport_ess"] <= 1.0:
        raise ValueError(f"transport_ess must be in (0, 1], got {o['transport_ess']}.")
    if o["final_ess"] is not None:
        check_number("final_ess", o["final_ess"], positive=True)
        if not o["final_ess"] >= 2:
            raise ValueError(
                f"final_ess is a number of draws, at least 2 (default 0.8 × num_particles), "
                f"got {o['final_ess']}; for a fraction f of the particles pass "
                "f * num_particles."
            )
    if not o["min_moves"] <= o["max_moves"]:
        raise ValueError(f"need min_moves <= max_moves, got {o['min_moves']} and {o['max_moves']}.")
    for name, needs in _APPLIES_TO.items():
        unmet = {switch: needed for switch, needed in needs.items() if o[switch] != needed}
        set_here = name in given if given is not None else o[name] != defaults[name]
        if name in options and set_here and unmet:
            switch, needed = next(iter(unmet.items()))
            raise ValueError(
                f"{name} applies only with {switch}={needed!r} (here {switch}={o[switch]!r}, "
                f"where it is not used); leave it out or set {switch}={needed!r}."
            )
    if not o["waste_free"]:
        return
    length = o["chain_length"]
    if length < 2:
        raise ValueError(
            f"chain_length must be at least 2 for waste-free SMC, got {length} "
            "(or pass waste_free=False)."
        )
    if num_particles is not None and (num_particles % length or num_particles < 2 * length):
        raise ValueError(
            f"waste-free SMC runs {names['num_particles']} / chain_length Markov chains of "
            f"chain_length states, and needs two or more of them: {names['num_particles']} "
            f"({num_particles}) must be a multiple of chain_length ({length}) and at least "
            f"{2 * length} (or pass waste_free=False)."
        )


def effective_options(options: dict) -> dict:
    """Every tuning option of :func:`run_smc` as a run with ``options`` uses it: the
    defaults filled in and numbers as floats (counts as ints), so that two ways of
    asking for the same run compare equal (a checkpoint's fingerprint)."""
    merged = {name: _DEFAULTS[name] for name in TUNING_OPTIONS} | dict(options)
    counts = ("chain_length", "min_moves", "max_moves", "max_final_moves")
    return {
        name: int(value)
        if name in counts
        else (
            float(value)
            if isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
            else value
        )
        for name, value in merged.items()
    }


def default_num_particles(dim: int, chain_length: int = 10) -> int:
    """SMC's default particle count: 1000, or 100 per latent dimension beyond d = 10,
    rounded up to a multiple of ``chain_length``.

    Why it grows with d: the moves are built from the population's d × d covariance and
    its parameter-output cross-covariance, estimated from each stage's population. With
    too few particles for d those statistics are noisy and tied to the particles they
    move (``benchmarks/results/smc_dimension.md``, linear-Gaussian, 8 chains): with 1000
    particles the log evidence's spread over chains was 0.48 at d = 20 and 1.23 at d = 30,
    and at d = 50 the means were off by up to 1.6 posterior sds, the sds by 31 % and the
    log evidence by −12.7; with this default (2000, 3000, 5000) the spread was 0.29-0.47,
    the means within 0.06 sd and the sds within 4 %."""
    wanted = max(1000, 100 * int(dim))
    return -(-wanted // chain_length) * chain_length


def pooled_log_evidence(log_evidence_per_chain) -> float:
    """The chains' log evidences pooled: log of the mean of their Ẑ_c.

    Each chain's Ẑ_c is an unbiased estimate of p(y) and the chains are independent, so
    their mean is unbiased too and has 1/C of the variance; the mean of the logs (the log
    of the geometric mean) would add a downward bias of about half the logs' variance.
    NaN where any chain has none (a run stopped before t = 1)."""
    logs = np.asarray(log_evidence_per_chain, dtype=np.float64)
    if logs.size == 0 or not np.all(np.isfinite(logs)):
        return float("nan")
    top = logs.max()  # in float64 whatever JAX's precision
    return float(top + np.log(np.mean(np.exp(logs - top))))


def run_smc(
    problem,
    rng_key,
    num_particles: int | None = None,
    num_chains: int = 1,
    *,
    schedule: str = "ess",
    ess_target: float = 0.3,
    waste_free: bool = True,
    chain_length: int = 10,
    final_ess: float | None = None,
    max_final_moves: int = 200,
    transport: bool = True,
    transport_ess: float = 0.8,
    p_kalman: float | None = None,
    p_independent: float | None = None,
    min_moves: int = 1,
    max_moves: int = 10,
    corr_threshold: float = 0.2,
    rw_acceptance: float = 0.25,
    kalman_acceptance: float = 0.3,
    max_stages: int = 200,
    jitter: float = 1e-6,
    progress_bar: bool = False,
    checkpoint=None,
) -> SMCResult:
    """Tempered SMC from the prior (t = 0) to the posterior (t = 1) of ``problem``
    (an :class:`~eki_infer.tracing.InverseProblem`), ``num_chains`` independent runs of
    ``num_particles`` particles, side by side (default :func:`default_num_particles`:
    1000, or 100 per latent dimension beyond d = 10). See the module docstring for the
    algorithm; the keyword arguments are its tuning constants. ``schedule`` picks the
    tempering steps: ``"ess"`` (default; ``ess_target`` sets the ESS fraction each step
    keeps) or ``"dmc"`` (the data-misfit controller; ``ess_target`` is then unused).

    ``waste_free`` (default): every stage resamples N / ``chain_length`` particles and
    runs a Markov chain of ``chain_length`` states from each, and all states are the
    next population (``num_particles`` must be a multiple of ``chain_length``). At
    t = 1 the chains are then extended until the population's effective sample size
    (:func:`chain_ess`) reaches ``final_ess`` (default: 0.8 ``num_particles``), by at most
    ``max_final_moves`` moves; the result has M × (``chain_length`` + extra moves)
    draws per chain. ``waste_free=False``: resample all N and move each until the
    decorrelation criterion (``corr_threshold``, ``min_moves``, ``max_moves``) holds.
    ``transport`` (waste-free only): try the Kalman transport to t = 1 at every stage whose
    ordinary step stops short of it, and take it when the ESS fractions of its probe and
    of the whole transported population reach ``transport_ess``. ``p_kalman`` and
    ``p_independent`` fix the probabilities of the Kalman and the independence proposal
    (None: adapted; :func:`move`). The draws are ordered chain by chain
    (:class:`SMCResult`). The module docstring's last section gives the measurements
    behind the defaults.

    Chain c uses ``fold_in(rng_key, c)`` only, so chain 0 is the same whatever
    ``num_chains`` is (up to floating-point rounding in the batched computation), with
    one exception: waste-free SMC's final extension runs until every chain has met its
    target, so beside slower chains a chain gets more extra moves: each of its M Markov
    chains has the same first states, but more of them, and as the draws are stored
    chain by chain (draw i·L + b is Markov chain i's b-th state) the draw arrays are not
    prefixes of each other; compare ``draws.reshape(M, L, ...)[:, :L_alone]``.
    EKIInference's predictive noise follows the same rule (:func:`predictive_noise_draws`:
    one key per chain, Markov chain and state).

    ``checkpoint``: an :class:`eki_infer.checkpoint.Checkpoint`; the loop state (the
    populations with their adapted proposals, the history, the counters) is written to
    it after every stage, and a loaded checkpoint's state is continued from. Stage k and
    move m draw from ``fold_in(fold_in(chain_key, k), m)``, so a resumed run ends bit for
    bit where an uninterrupted one would.
    """
    tuning = {name: value for name, value in locals().items() if name in TUNING_OPTIONS}
    if num_particles is None:  # the default depends on chain_length: check it first
        check_options(None, num_chains, max_stages, **tuning)
        num_particles = default_num_particles(problem.dim, chain_length if waste_free else 1)
    check_options(num_particles, num_chains, max_stages, **tuning)
    y, noise = problem.observations, problem.noise
    options = {
        "ess_target": float(ess_target),
        "schedule": schedule,
        "p_kalman": None if p_kalman is None else float(p_kalman),
        "p_independent": None if p_independent is None else float(p_independent),
        "rw_acceptance": float(rw_acceptance),
        "kalman_acceptance": float(kalman_acceptance),
        "jitter": float(jitter),
    }
    steps, data = _compiled_steps(problem, options)
    init_chains, stage_start, move_chains, select_heads, _, *transport_steps = steps
    transport_probe, transport_finish = transport_steps
    per_chain = chain_keys(rng_key, jnp.arange(num_chains))
    init_keys = fold_keys(per_chain, 0)
    num_heads = num_particles // chain_length if waste_free else num_particles
    use_transport = waste_free and transport
    # the transport is probed on the population's last block (the chains' last states)
    probe_rows = jnp.arange(num_particles - num_heads, num_particles)
    rest_rows = jnp.arange(num_particles - num_heads)
    # cross-fitting folds: row b·M + i belongs to chain i; even and odd chains
    folds = (jnp.arange(num_particles) % num_heads) % 2

    saved = checkpoint.current if checkpoint is not None else None
    if saved is not None:
        states = jax.tree.map(jnp.asarray, saved["states"])
        if states.p_independent is None:  # a checkpoint from before that proposal
            states = states._replace(p_independent=jnp.full_like(states.p_kalman, 0.1))
        initial = saved["initial"]
        evaluations = np.asarray(saved["evaluations"]).copy()
        # a checkpoint from before this count: the chains' own counts are the best guess
        runs = int(saved.get("runs", evaluations.sum()))
        records = {name: list(rows) for name, rows in saved["records"].items()}
        # a checkpoint from before the transport or the independence proposal
        for name, fill in (
            ("transport_probe_ess", np.nan),
            ("transported", 0),
            ("acceptance_independent", np.nan),
            ("p_independent", 0.0),
            ("misfit_sd", np.nan),
        ):
            records.setdefault(name, [np.full(num_chains, fill)] * len(records["t"]))
        rounds, first_stage = saved["rounds"], saved["stage"] + 1
        pending_failed = np.zeros(num_chains, dtype=np.int64)  # recorded before
        finished = saved.get("finished", False)
        start_time = time.perf_counter() - saved["wall_time"]
    else:
        start_time = time.perf_counter()
        states = init_chains(init_keys, int(num_particles), data, y, noise)
        initial = np.asarray(states.particles)
        evaluations = np.full(num_chains, num_particles, dtype=np.int64)
        runs = num_chains * num_particles
        prior_finite = np.isfinite(np.asarray(states.misfit)).sum(axis=1)
        _check_finite(prior_finite, 0, "the prior draws")
        # counted in the first stage's num_failed
        pending_failed = num_particles - prior_finite
        _warn_prior_failures(pending_failed, num_particles)
        records = {name: [] for name in SMCHistory._fields}
        rounds, first_stage, finished = 1, 1, False
    # Sample correlations of independent columns are ~N(0, 1/N): never ask for less.
    threshold = max(corr_threshold, 3.0 / math.sqrt(num_heads))
    const = -0.5 * (float(noise.logdet()) + problem.data_dim * math.log(2.0 * math.pi))
    bar = _progress(progress_bar)

    def save(stage, done=False):
        if checkpoint is not None:
            checkpoint.save_progress(
                0,
                {
                    "stage": stage,
                    "states": states,
                    "initial": initial,
                    "evaluations": evaluations,
                    "runs": runs,
                    "records": records,
                    "rounds": rounds,
                    "finished": done,
                    "wall_time": time.perf_counter() - start_time,
                },
            )

    def record(active, dt, ess, moves, acceptance, corr, failed, sample_ess, transport):
        acc_rw, acc_kal, acc_ind = (acceptance[k] for k in ("rw", "kalman", "independent"))
        phi = np.asarray(states.misfit)
        records["transport_probe_ess"].append(transport[0])
        records["transported"].append(transport[1])
        records["t"].append(np.asarray(states.t))
        records["dt"].append(np.where(active, np.asarray(dt), 0.0))
        records["ess"].append(np.where(active, np.asarray(ess), 1.0))
        records["moves"].append(np.where(active, moves, 0))
        for name, rates in (("rw", acc_rw), ("kalman", acc_kal), ("independent", acc_ind)):
            rate = np.mean(rates, axis=0) if len(rates) else np.full(num_chains, np.nan)
            records[f"acceptance_{name}"].append(np.where(active, rate, np.nan))
        records["rw_scale"].append(np.asarray(states.rw_scale))
        records["kalman_step"].append(np.asarray(states.kalman_step))
        records["p_kalman"].append(np.asarray(states.p_kalman))
        records["p_independent"].append(np.asarray(states.p_independent))
        records["correlation"].append(np.where(active, corr, np.nan))
        records["sample_ess"].append(sample_ess)
        finite = np.where(np.isfinite(phi), phi, np.nan)
        records["misfit_mean"].append(np.nanmean(finite, 1))
        records["misfit_sd"].append(np.nanstd(finite, 1))
        records["num_failed"].append(failed)
        records["log_evidence"].append(np.asarray(states.log_z) + const)
        records["forward_evaluations"].append(evaluations.copy())
        records["wall_time"].append(np.full(num_chains, time.perf_counter() - start_time))

    done_stage = first_stage - 1  # the last stage recorded
    floor_warned = False  # _warn_step_floor speaks once a run
    try:
        for stage in range(first_stage, max_stages + 1):
            active = np.asarray(states.t) < 1.0
            if finished or not active.any():
                break
            stage_keys = fold_keys(per_chain, stage)
            keys = fold_keys(stage_keys, 0)
            resampled, stats, dt, ess, finite = stage_start(
                keys, states, jnp.asarray(active), y, noise
            )
            t_before = np.asarray(states.t)
            tried = np.full(num_chains, np.nan)
            transported = np.zeros(num_chains, dtype=bool)
            # the stage's failed forward runs besides its moves' (prior draws, transport)
            other_failed, pending_failed = pending_failed, np.zeros(num_chains, dtype=np.int64)
            probing = active & (np.asarray(resampled.t) < 1.0)  # the plain step stops short
            if use_transport and probing.any():
                maps, probe, p_ess, p_failed = transport_probe(
                    states, probe_rows, folds, data, y, noise
                )
                other_failed += np.where(active, np.asarray(p_failed), 0)
                evaluations += np.where(active, num_heads, 0)
                runs += num_chains * num_heads
                rounds += 1
                tried = np.where(probing, np.asarray(p_ess), np.nan)
                trying = probing & (tried >= transport_ess)
                if trying.any():
                    t_states, t_stats, t_ess, t_finite, t_failed = transport_finish(
                        keys, states, maps, probe, rest_rows, folds, data, y, noise
                    )
                    other_failed += np.where(active, np.asarray(t_failed), 0)
                    evaluations += np.where(active, num_particles - num_heads, 0)
                    runs += num_chains * (num_particles - num_heads)
                    rounds += 1
                    transported = trying & (np.asarray(t_ess) >= transport_ess)
                    chosen = jnp.asarray(transported)
                    resampled = _keep_inactive(t_states, resampled, chosen)
                    stats = _keep_inactive(t_stats, stats, chosen)
                    dt = np.where(transported, 1.0 - np.asarray(states.t), np.asarray(dt))
                    ess = np.where(transported, np.asarray(t_ess), np.asarray(ess))
                    finite = np.where(transported, np.asarray(t_finite), np.asarray(finite))
            finite = np.asarray(finite)
            _check_finite(np.where(active, finite, num_particles), stage, "reweighting")
            if schedule == "ess" and not floor_warned:
                bad = _step_floor_collapse(
                    t_before, dt, ess, finite / num_particles, active & ~transported, ess_target
                )
                if bad.size:
                    _warn_step_floor(bad, dt, ess, stage)
                    floor_warned = True
            acceptance = {"rw": [], "kalman": [], "independent": []}
            failed_total = np.zeros(num_chains, dtype=np.int64)
            moves = 0
            corr = np.zeros(num_chains)
            if waste_free:
                heads, stats = select_heads(
                    fold_keys(stage_keys, _HEADS), resampled, stats, chain_length
                )
                blocks = [heads]
                last_move = chain_length - 1
            else:
                heads, last_move = resampled, max_moves
            for m in range(1, last_move + 1):
                keys = fold_keys(stage_keys, m)
                heads, info = move_chains(keys, heads, stats, jnp.asarray(active), data, y, noise)
                *rates, n_failed, corr = (np.asarray(x) for x in info)
                for name, rate in zip(acceptance, rates, strict=True):
                    acceptance[name].append(rate)
                failed_total += np.where(active, n_failed, 0)
                evaluations += np.where(active, num_heads, 0)
                runs += num_chains * num_heads
                moves, rounds = m, rounds + 1
                if waste_free:
                    blocks.append(heads)
                elif m >= min_moves and np.all(corr[active] < threshold):
                    break
            _check_move_failures(failed_total, np.where(active, moves * num_heads, 0), stage)
            if waste_free:
                states = _keep_inactive(_stack_blocks(blocks, states), states, active)
                sample_ess = np.where(active, chain_ess(states.particles, num_heads, stats), np.nan)
            else:
                states, sample_ess = heads, np.full(num_chains, np.nan)
            record(
                active,
                dt,
                ess,
                moves,
                acceptance,
                corr,
                failed_total + other_failed,
                sample_ess,
                (tried, transported.astype(np.int64)),
            )
            save(stage)
            done_stage = stage
            if bar is not None:
                bar.update(1)
                bar.set_postfix(t=f"{float(np.min(states.t)):.3g}", moves=moves)
        if waste_free and not finished and np.all(np.asarray(states.t) >= 1.0):
            target = float(0.8 * num_particles if final_ess is None else final_ess)
            states, extension = _extend_final_chains(
                steps, states, per_chain, num_heads, target, max_final_moves, (data, y, noise)
            )
            extra = extension["moves"]
            _check_move_failures(
                extension["failed"], np.full(num_chains, extra * num_heads), "t = 1 (extension)"
            )
            reached = np.asarray(extension["ess"], dtype=float)
            below = np.nonzero(reached < target)[0]
            if below.size:
                if extra >= max_final_moves:
                    why = (
                        f"the extension stopped at max_final_moves={max_final_moves}"
                        if max_final_moves
                        else "max_final_moves=0 allows no extension"
                    )
                else:
                    why = (
                        f"after {extra} extra moves it grew by less than 25 % while the "
                        "chains doubled in length, as it does when chains stay in separate "
                        "modes or in a region they barely leave (a funnel's neck), and as a "
                        "noisy estimate from few chains can"
                    )
                warn(
                    f"SMC's final effective sample size stayed below its target {target:g} "
                    f"in chains {below.tolist()} ({np.round(reached[below], 1).tolist()}): "
                    f"{why}. The draws are worth fewer independent ones than their number; "
                    "for more precision use more particles or chains.",
                    UserWarning,
                )
            evaluations += extra * num_heads
            runs += num_chains * extra * num_heads
            rounds += extra
            ones = np.ones(num_chains, dtype=bool)
            record(
                ones,
                0.0,
                1.0,
                extra,
                extension["acceptance"],
                extension["corr"],
                extension["failed"],
                extension["ess"],
                (np.full(num_chains, np.nan), np.zeros(num_chains, dtype=np.int64)),
            )
            save(done_stage + 1, done=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(t="1", moves=extra)
    except SMCError as error:
        error.history = _stack_history(records, num_chains)  # what was recorded, for diagnosis
        raise
    finally:
        if bar is not None:
            bar.close()
    if waste_free:
        states = _chain_major(states, num_heads)
    unfinished = np.asarray(states.t) < 1.0
    if np.any(unfinished):
        warn(
            f"max_stages={max_stages} (EKIInference's max_iterations) reached before t = 1 "
            f"(t = {np.asarray(states.t)}); the particles do not target the posterior yet, "
            f"and chains {np.nonzero(unfinished)[0].tolist()} have no log evidence (NaN; "
            "history.log_evidence holds the normaliser of the tempered target they "
            "reached). Increase it.",
            UserWarning,
        )
    history = _stack_history(records, num_chains)
    if waste_free:
        _warn_small_population(history.sample_ess, problem.dim)
    else:
        _warn_resample_move(history, num_particles, problem.dim, max_moves, threshold)
    return SMCResult(
        particles=np.asarray(states.particles),
        outputs=np.asarray(states.outputs),
        initial_particles=initial,
        log_evidence=np.where(unfinished, np.nan, np.asarray(states.log_z) + const),
        history=history,
        forward_evaluations=evaluations,
        forward_runs=runs,
        sequential_rounds=rounds,
        state=states,
    )


#: run_smc's default tuning options (check_options compares against them)
_DEFAULTS = {name: p.default for name, p in inspect.signature(run_smc).parameters.items()}


def _stack_history(records: dict, num_chains: int) -> SMCHistory:
    """The per-stage records (lists of per-chain rows) as an :class:`SMCHistory`."""
    return SMCHistory(
        **{k: np.stack(v, axis=1) if v else np.zeros((num_chains, 0)) for k, v in records.items()}
    )


# fold_in indices of a stage key that are not move numbers (moves count from 1)
_HEADS = 2**20
# fold_in indices of a chain key that are not stage numbers (stages count from 1)
_FINAL_STAGE = RESERVED_KEY_INDEX
_PREDICTIVE_NOISE = RESERVED_KEY_INDEX + 1


def predictive_noise_draws(noise, rng_key, num_chains: int, num_heads: int, num_draws: int):
    """Observation-noise draws for the posterior predictive, ``(chains, draws, M)``.

    Draw i·L + b (Markov chain i's b-th state, :class:`SMCResult`; resample-move: L = 1)
    gets the key ``fold_in(fold_in(fold_in(chain_key, 2**30 + 1), i), b)``: a chain's
    noise depends on its own key and on the state's place in its Markov chain only, not
    on how many chains ran or how long the final extension was (which sets L), so chain
    0's predictive is the same beside any other chains, as its draws are."""
    length, rest = divmod(num_draws, num_heads)
    if rest:
        raise ValueError(f"{num_draws} SMC draws are not {num_heads} Markov chains' states")
    noise_keys = fold_keys(chain_keys(rng_key, jnp.arange(num_chains)), _PREDICTIVE_NOISE)

    def per_chain(key):
        def per_head(i):
            head = jax.random.fold_in(key, i)
            states = jnp.arange(length)
            return jax.vmap(lambda b: noise.sample(jax.random.fold_in(head, b)))(states)

        return jax.vmap(per_head)(jnp.arange(num_heads)).reshape(num_heads * length, -1)

    return jax.vmap(per_chain)(noise_keys)


def _extend_final_chains(steps, states, per_chain, num_heads, target, max_moves, args):
    """The waste-free population at t = 1 with its M chains run on until
    :func:`chain_ess` ≥ ``target`` in every run (or ``max_moves`` more moves), all states
    kept. The kernel's statistics are those of the whole t = 1 population. Returns
    ``(states, extension)``, extension a dict of the move count and the per-run mean
    acceptances, failures, decorrelation and final ESS (for the history row)."""
    _, _, move_chains, _, population_stats, _, _ = steps
    data, y, noise = args
    num_chains, n = states.misfit.shape
    stats = population_stats(states, y, noise)
    blocks = [_take_block(states, b * num_heads, num_heads) for b in range(n // num_heads)]
    heads = blocks[-1]
    stats = _with_start(stats, heads)
    keys0 = fold_keys(per_chain, _FINAL_STAGE)
    everyone = jnp.ones(num_chains, dtype=bool)
    acceptance = {"rw": [], "kalman": [], "independent": []}
    failed = np.zeros(num_chains, dtype=np.int64)
    corr = np.full(num_chains, np.nan)
    particles = [np.asarray(states.particles)]  # host copies, for the ESS only
    ess = chain_ess(particles[0], num_heads, stats)
    trace = [ess]  # trace[k]: the ESS after k extra moves
    moves = 0
    while moves < max_moves and not np.all((ess >= target) | _stalled(trace, len(blocks))):
        moves += 1
        heads, info = move_chains(fold_keys(keys0, moves), heads, stats, everyone, data, y, noise)
        *rates, n_failed, corr = (np.asarray(x) for x in info)
        for name, rate in zip(acceptance, rates, strict=True):
            acceptance[name].append(rate)
        failed += n_failed
        blocks.append(heads)
        particles.append(np.asarray(heads.particles))
        ess = chain_ess(np.concatenate(particles, axis=1), num_heads, stats)
        trace.append(ess)
    if moves:
        states = _stack_blocks(blocks, states)
    nan = [np.full(num_chains, np.nan)]
    return states, {
        "moves": moves,
        "acceptance": {name: rates or nan for name, rates in acceptance.items()},
        "failed": failed,
        "corr": corr,
        "ess": ess,
    }


def _stalled(trace: list, length: int) -> np.ndarray:
    """Runs whose ESS grew by less than 25 % while the chains doubled in length (to
    ``length`` states from half of it); False until the chains have doubled. An ESS that
    stops growing means chains that stay where they are: in separate modes that no
    proposal crosses (the ESS of M chains that never cross between modes levels off at
    about M) or in a region the proposals barely leave (the neck of a funnel). The
    weights of those regions are then the ones the reweightings and resamplings set,
    which more moves at the same rate would barely change."""
    first = length - (len(trace) - 1)  # chain length before the extension
    half = length // 2 - first
    if half < 0:
        return np.zeros_like(trace[-1], dtype=bool)
    return trace[-1] < 1.25 * trace[half]


def _chain_major(states: SMCState, num_heads: int) -> SMCState:
    """A waste-free population reordered chain by chain: row i·L + b holds Markov chain
    i's b-th state (it was row b·M + i), so that consecutive draws are consecutive states
    of one chain and ArviZ's autocorrelation-based ESS and MCSE see their correlation."""
    n = states.misfit.shape[-1]
    order = jnp.arange(n).reshape(n // num_heads, num_heads).T.reshape(-1)
    return states._replace(
        particles=states.particles[:, order],
        outputs=states.outputs[:, order],
        misfit=states.misfit[:, order],
        log_weights=states.log_weights[:, order],
    )


def _take_block(states: SMCState, start: int, size: int) -> SMCState:
    """Rows ``start:start + size`` of every chain's population."""
    return jax.vmap(_take_rows, in_axes=(0, None))(states, jnp.arange(start, start + size))


def _with_start(stats: MoveStats, heads: SMCState) -> MoveStats:
    """``stats`` whose decorrelation reference is the chains' starting points ``heads``
    (chain axis first), in the stage's L-coordinates."""
    start = jnp.einsum("cmd,ced->cme", heads.particles - stats.mean[:, None], stats.chol_inv)
    return stats._replace(start=start)


def _check_move_failures(failed, proposed, stage):
    """Raises :class:`SMCError` where every proposal of a chain's moves failed, and warns
    where more than half did: the forward map fails where the tempered posterior is."""
    failed, proposed = np.asarray(failed), np.asarray(proposed)
    every = np.nonzero((proposed > 0) & (failed >= proposed))[0]
    if every.size:
        raise SMCError(
            f"SMC stage {stage} (moves): every one of the {proposed[every].tolist()} proposals "
            f"failed (non-finite forward output or misfit) in chains {every.tolist()}. The "
            "forward map fails (the simulator raised, timed out or returned NaN/inf) or its "
            "misfit overflows wherever the moves go; check the model or the simulator."
        )
    most = np.nonzero((proposed > 0) & (2 * failed > proposed))[0]
    if most.size:
        warn(
            f"SMC stage {stage} (moves): {failed[most].tolist()} of {proposed[most].tolist()} "
            f"proposals failed (non-finite forward output or misfit: the simulator raised, "
            f"timed out or returned NaN/inf) in chains {most.tolist()}; the failed proposals "
            "are rejected, so the moves mix that much more slowly.",
            UserWarning,
        )


#: Below this many effective draws per latent dimension in a stage's population, the moves'
#: statistics (a d × d covariance) are too noisy (:func:`_warn_small_population`).
_MIN_ESS_PER_DIM = 10


def _warn_small_population(sample_ess, dim: int) -> None:
    """Warns where a waste-free stage's population was worth fewer than 10 d independent
    draws (:func:`chain_ess`; NaN rows, inactive chains, are skipped).

    Why 10 d (``benchmarks/results/smc_dimension.md``, linear-Gaussian, 8 chains): with
    1000 particles the smallest stage ESS was 6.3 d at d = 20, 3.7 d at d = 30 and 2.1 d
    at d = 50, where the log evidence's spread over chains was 0.48, 1.23 and 7.4 and, at
    d = 50, the means were off by up to 1.6 sd; with the default particle count it was
    14.0-16.6 d, the spread 0.29-0.47 and the moments within 0.06 sd and 4 %. The
    reference models (d ≤ 10, 1000 particles) stay above 23 d."""
    ess = np.asarray(sample_ess, dtype=float)
    if not ess.size or np.all(np.isnan(ess)):
        return
    low = np.nanmin(np.where(np.isnan(ess), np.inf, ess), axis=1)
    bad = np.nonzero(low < _MIN_ESS_PER_DIM * dim)[0]
    if bad.size:
        _small_population_warning(
            f"the population's effective sample size fell to {np.round(low[bad], 1).tolist()} "
            f"(chains {bad.tolist()}) at some stage,",
            dim,
        )


def _small_population_warning(what: str, dim: int) -> None:
    """The small-population warning of :func:`_warn_small_population`, ``what`` first."""
    warn(
        f"SMC: {what} below {_MIN_ESS_PER_DIM} × d = {_MIN_ESS_PER_DIM * dim} for d = {dim}. "
        "The moves are built from the population's d × d covariance, which so few "
        "effective draws estimate poorly and tie to the particles they move: the log "
        "evidence and, with fewer still, the posterior moments come out wrong (on a "
        "linear-Gaussian problem with 1000 particles the log evidence's spread over chains "
        "was 1.2 at d = 30, and at d = 50 the means were 1.6 sd off). Use more particles "
        "(the default is 100 × d beyond d = 10).",
        UserWarning,
    )


def _warn_resample_move(history: SMCHistory, num_particles, dim, max_moves, threshold) -> None:
    """Resample-move's warnings, read off the history (so a resumed run warns about the
    stages before its interruption too).

    It records no population ESS, so the small-population rule compares
    ``num_particles``, the most its population can be worth, with 10 d. And it warns about
    stages whose moves stopped at ``max_moves`` with some chain's particles still
    correlated with their resampled starts above ``threshold``: duplicated particles then
    stay close together, so the population is worth fewer draws than its size and the
    next stage's weights (and the evidence) are noisier."""
    if num_particles < _MIN_ESS_PER_DIM * dim:
        _small_population_warning(
            f"num_particles={num_particles} (EKIInference's ensemble_size), the most a "
            "resample-move population can be worth,",
            dim,
        )
    corr = np.asarray(history.correlation, dtype=float)
    stuck = (np.asarray(history.moves) >= max_moves) & (np.nan_to_num(corr, nan=-1.0) >= threshold)
    stages = np.nonzero(stuck.any(axis=0))[0]
    if not stages.size:
        return
    listed = "; ".join(
        f"stage {k + 1}: chains {np.nonzero(stuck[:, k])[0].tolist()} "
        f"(correlation up to {np.max(corr[stuck[:, k], k]):.2f})"
        for k in stages[:5]
    )
    more = f" and {stages.size - 5} more stages" if stages.size > 5 else ""
    warn(
        f"SMC (resample-move): the moves stopped at max_moves={max_moves} before the "
        f"particles decorrelated from their resampled starts (correlation below "
        f"{threshold:.2f}) in {listed}{more}. The population holds near-copies, so it is "
        "worth fewer draws than its size. Raise max_moves, or use waste-free SMC (the "
        "default), whose chains' states all count.",
        UserWarning,
    )


def _warn_prior_failures(failed, num_particles: int) -> None:
    """Warns where the forward map failed for more than half of a chain's prior draws."""
    failed = np.asarray(failed)
    if np.any(2 * failed > num_particles):
        warn(
            f"SMC: the forward map failed (non-finite output or misfit) for {failed.tolist()} "
            f"of the {num_particles} prior draws (per chain). They get zero weight, so the "
            "run rests on the draws where it works and describes the posterior there; "
            "check the model or the simulator where it fails (history.num_failed counts "
            "these in the first stage).",
            UserWarning,
        )


def _step_floor_collapse(t, dt, ess, finite, active, ess_target: float):
    """The chains whose ESS-rule step sits at the floor of its bisection (about 1e-277 of
    the remaining 1 − t in float64, :func:`choose_dt`) and whose weights still collapsed
    (ESS below half its target): the population's misfits differ by more than any step
    can temper. ``ess`` is the ESS fraction of the N particles, ``finite`` the fraction
    with a finite misfit (the rule's target is ``ess_target`` times that)."""
    t, ess, finite = (np.asarray(x, dtype=float) for x in (t, ess, finite))
    dt = np.asarray(dt)
    floor = np.finfo(dt.dtype).tiny ** _DT_FLOOR_EXPONENT * (1.0 - t)
    at_floor = np.asarray(active) & (dt > 0) & (dt <= 1.01 * floor)
    return np.nonzero(at_floor & (ess < 0.5 * ess_target * finite))[0]


def _warn_step_floor(bad, dt, ess, stage) -> None:
    """Warns (once a run) about the chains :func:`_step_floor_collapse` found. A run can
    recover, so it goes on; where it does not, t creeps by tiny steps until
    ``max_stages``."""
    warn(
        f"SMC stage {stage}: the tempering step reached its floor (Δt = "
        f"{np.asarray(dt)[bad].tolist()}) and the weights still collapsed (ESS fractions "
        f"{np.round(np.asarray(ess, dtype=float)[bad], 4).tolist()}) in chains {bad.tolist()}: the "
        "misfits Φ = ½‖Γ^(-1/2)(y − G(u))‖² of the population differ by more than any step "
        "can temper. If later stages stay at the floor, t creeps towards 1 until max_stages "
        "(EKIInference's max_iterations); the data then lie far outside what the prior "
        "predicts or the noise is far too small: check the model, the data's units and the "
        "noise.",
        UserWarning,
    )


def _check_finite(finite_counts, stage, where):
    bad = np.nonzero(np.asarray(finite_counts) < 2)[0]
    if bad.size:
        raise SMCError(
            f"SMC stage {stage} ({where}): fewer than 2 particles with a finite misfit in "
            f"chains {bad.tolist()} (finite: {np.asarray(finite_counts)[bad].tolist()}). On "
            "most of the prior or of the tempered posterior the forward map fails (the "
            "simulator raised or returned NaN/inf) or its output is so far from the data that "
            "the misfit ½‖Γ^(-1/2)(y − G(u))‖² overflows; check the model, the data's units "
            "and the noise, or use more particles."
        )


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="SMC", unit="stage", leave=True)

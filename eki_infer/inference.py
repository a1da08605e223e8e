"""EKIInference: the user-facing engine, shaped like NumPyro's ``MCMC``.

It glues the three independent layers together and is the only module that knows them
all: the tracer (model → :class:`~eki_infer.tracing.InverseProblem`), a process
(EKI, EKS or UKI over whitened parameters u) and a scheduler (the step Δt), and it
turns the final ensemble into an ArviZ object.

One iteration, for all chains at once:

1. ``evaluate`` (one jitted call): the process's points (members or sigma points) for
   every chain, pushed through the model once each (``vmap`` over points and chains),
   giving the constrained values and the forward outputs G(u); rows with NaN/inf fail.
2. Host-side checks: at least two successful members per running chain, else
   :class:`~eki_infer.processes.EnsembleFailureError` naming the iteration.
3. ``advance`` (one jitted call): the scheduler's Δt from the whitened residuals, the
   process update, and the history statistics. A non-finite Δt (degenerate data-misfit
   controller) raises :class:`SchedulerError` naming the iteration.

Chains are independent ensembles. Chain c draws from ``fold_in(rng_key, c)`` and
iteration n of chain c from ``fold_in(chain_key, n)``, so the same key gives the same
result bit for bit and chain 0 is the same whatever ``num_chains`` is (SMC: up to
the length of its final extension, which runs until every chain is done, so chain 0's
Markov chains have more states beside slower chains: :func:`eki_infer.smc.run_smc`). Chains that
finish early (the data-misfit controller reached T) are frozen by Δt = 0 while the
others go on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eki_infer import processes as _processes
from eki_infer import schedulers as _schedulers
from eki_infer.blas_threads import limited_blas_threads
from eki_infer.checkpoint import Checkpoint, key_fingerprint
from eki_infer.convert import group, to_arviz
from eki_infer.executors import active_executor, using_executor
from eki_infer.keys import RESERVED_KEY_INDEX, chain_keys, check_rng_key, fold_keys
from eki_infer.model_args import digest_leaves, split_model_args
from eki_infer.steps import compile_steps
from eki_infer.tracing import trace_model
from eki_infer.user_warnings import warn
from eki_infer.validation import check_count, check_flag

__all__ = ["METHODS", "EKIInference", "RunHistory", "SchedulerError", "default_ensemble_size"]

METHODS = ("eki", "eks", "uki", "smc")


class SchedulerError(RuntimeError):
    """The scheduler produced no usable step (non-finite or non-positive Δt)."""


class RunHistory(NamedTuple):
    """Per-iteration record of a run; every field has shape (num_chains, num_iterations).

    Iteration n describes the ensemble *before* update n: its time ``t`` (after the
    update), the step ``dt`` taken (0 once a chain has finished), the mean and standard
    deviation over successful members of the data misfit ½‖Γ^{-1/2}(y − G(u))‖², the
    number of failed members, the cumulative number of forward-model evaluations, and
    the cumulative wall time in seconds (shared by all chains; with
    ``chain_method="sequential"`` each chain's own clock, so the run's total is the sum
    of the chains' last entries).
    """

    t: np.ndarray
    dt: np.ndarray
    misfit_mean: np.ndarray
    misfit_sd: np.ndarray
    num_failed: np.ndarray
    forward_evaluations: np.ndarray
    wall_time: np.ndarray


def default_ensemble_size(dim: int) -> int:
    """Ten members per parameter, at least 100 and at most 1000.

    EKI keeps its members in the span of the initial ensemble, so J ≥ d + 1 is needed
    for a full-rank posterior covariance; Monte-Carlo error falls like J^{-1/2}. Ten per
    parameter keeps that error near 0.1 posterior sd on near-Gaussian problems.
    """
    return int(min(max(100, 10 * dim), 1000))


#: the run attribute ``chain_meaning``: what a chain is, so what R-hat across them compares
_CHAIN_MEANING = {
    "eki": "independent ensemble (R-hat compares runs, not Markov chains)",
    "eks": "independent ensemble (R-hat compares runs, not Markov chains)",
    "uki": (
        "draws from the same deterministic UKI Gaussian (every chain runs the same "
        "iteration; R-hat is 1 by construction)"
    ),
}


def _named_fingerprint(options, settings, problem, key, settings_name: str) -> tuple:
    """A checkpoint fingerprint as ``(name, value)`` pairs, so that a mismatch names what
    differs (:class:`~eki_infer.checkpoint.CheckpointMismatchError`)."""
    return (
        ("method and options", options),
        (settings_name, settings),
        ("model's sites and shapes", repr(problem)),
        ("data", _data_digest(problem)),
        ("model's priors, noise or forward map", problem.probe_signature),
        ("rng_key", key),
    )


def _default_max_iterations(method: str) -> int:
    return {"eki": 100, "uki": 100, "eks": 200, "smc": 200}[method]


class EKIInference:
    """Derivative-free posterior approximation of a NumPyro model by an ensemble Kalman
    method, run from the prior to the posterior.

    Args:
        model: a NumPyro model with continuous latent sites and Gaussian observation
            sites with known noise.
        method: ``"eki"`` (ensemble Kalman inversion, tempered from prior to T = 1 by the
            data-misfit controller), ``"eks"`` (ensemble Kalman sampler with the ALDI
            correction, run to equilibrium under the stable scheduler) or ``"uki"``
            (unscented Kalman inversion as unscented tempering to T = 1) or ``"smc"``
            (tempered sequential Monte Carlo with Kalman-informed MH moves and a Kalman
            transport to T = 1 where the posterior is close to Gaussian,
            :mod:`eki_infer.smc`: exact as the particle number grows; ``ensemble_size``
            is the particle count per chain, a multiple of the waste-free chain length
            10, default 1000 or 100 per latent dimension beyond d = 10
            (:func:`eki_infer.smc.default_num_particles`); the posterior holds the final
            waste-free population, at least that many draws per chain;
            ``max_iterations`` bounds the stages; ``smc_options`` passes tuning keywords
            to :func:`eki_infer.smc.run_smc`; gives ``log_evidence``).
        ensemble_size: members per chain (EKI/EKS). Default
            :func:`default_ensemble_size` of the latent dimension. UKI uses 2d + 1
            sigma points and ignores it.
        num_chains: independent ensembles, run side by side (vmapped).
        scheduler: a scheduler from :mod:`eki_infer.schedulers`. Default: the
            data-misfit controller to T = 1 for EKI and UKI, ``EKSStableScheduler`` for
            EKS.
        max_iterations: upper bound on iterations (default 100 for EKI/UKI, 200 for
            EKS and for SMC's stages). EKS and schedulers that never terminate run
            exactly this many.
        num_samples: posterior draws per chain for UKI (from its Gaussian); the other
            methods' draws are their members or particles, and they ignore it.
        eki_variant: EKI only: ``"perturbed"`` (perturbed observations, default) or
            ``"transform"`` (deterministic square-root update).
        aldi: EKS only: the ALDI finite-ensemble correction (default True).
        uki_mode: UKI only: ``"tempering"`` (default, prior to T = 1) or
            ``"iterative"``. These three, and ``smc_options``, raise a ValueError when
            given to another method (rather than being ignored); so do counts that are
            not integers (flags that are not bools raise a TypeError).
        chain_method: ``"vectorized"`` (default: all chains in one vmapped computation)
            or ``"sequential"`` (one chain after another, less memory). Either way chain
            c depends only on ``(rng_key, c)``; sequential chains are bit-identical
            whatever ``num_chains`` is, vectorized ones agree to floating-point rounding
            (XLA may pick other kernels for another batch size).
        keep_path: keep every iteration's points (members or sigma points) as
            ``self.path``: a dict with ``"u"`` (chains, iterations + 1, P, d) in whitened
            space and each site's constrained values (chains, iterations + 1, P, ...).
        executor: how black-box simulators in the model (see
            :func:`eki_infer.simulators.black_box`) are mapped over the ensemble: an
            :mod:`eki_infer.executors` instance (serial, threads, processes, Dask).
            Default: serial. JAX forward maps ignore it (they are vmapped).
        progress_bar: show a tqdm bar with iteration, t, Δt and mean misfit.
        smc_options: SMC only: tuning keywords for :func:`eki_infer.smc.run_smc`
            (checked when the engine is built; one that the chosen variant does not
            read, such as ``chain_length`` with ``waste_free=False``, raises, even at its
            default value; ``num_particles``, ``num_chains``, ``max_stages`` and
            ``progress_bar`` are the engine's own arguments and raise here).
        blas_threads: threads the BLAS/LAPACK library (SciPy's OpenBLAS, which jaxlib
            uses for CPU factorisations) may use during a run, restored afterwards
            (:mod:`eki_infer.blas_threads`). Default 1: an ensemble step's
            factorisations are small, and idle OpenBLAS threads spinning after each
            one slow the next forward evaluation down. ``None`` leaves the setting
            alone (worth it only for UKI with d in the thousands).
    """

    def __init__(
        self,
        model,
        method: str = "eki",
        *,
        ensemble_size: int | None = None,
        num_chains: int = 1,
        scheduler=None,
        max_iterations: int | None = None,
        num_samples: int = 1000,
        eki_variant: str | None = None,
        aldi: bool | None = None,
        uki_mode: str | None = None,
        chain_method: str = "vectorized",
        keep_path: bool = False,
        executor=None,
        progress_bar: bool = True,
        smc_options: dict | None = None,
        blas_threads: int | None = 1,
    ):
        if not callable(model):
            raise TypeError(
                f"model must be a NumPyro model (a callable), got {type(model).__name__}."
            )
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        check_count("num_chains", num_chains, 1)
        if ensemble_size is not None:
            check_count(
                "ensemble_size", ensemble_size, 2, "(ensemble covariances need two members)"
            )
        if max_iterations is not None:
            check_count("max_iterations", max_iterations, 1, maximum=RESERVED_KEY_INDEX - 1)
        if chain_method not in ("vectorized", "sequential"):
            raise ValueError(
                f"chain_method must be 'vectorized' or 'sequential', got {chain_method!r}."
            )
        check_count("num_samples", num_samples, 1)
        if blas_threads is not None:
            check_count("blas_threads", blas_threads, 1, "(or None)")
        for name, value in (("keep_path", keep_path), ("progress_bar", progress_bar)):
            check_flag(name, value)
        method_options = {
            "eki_variant": (eki_variant, "eki", _processes.EKI_VARIANTS),
            "aldi": (aldi, "eks", (True, False)),
            "uki_mode": (uki_mode, "uki", _processes.UKI_MODES),
            "smc_options": (smc_options, "smc", None),
        }
        for name, (value, owner, allowed) in method_options.items():
            if value is None:
                continue
            if method != owner:
                raise ValueError(
                    f"{name} applies to method={owner!r} only; this engine's method is {method!r}."
                )
            if name == "aldi":
                check_flag(name, value)
            elif allowed is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        self.model = model
        self.method = method
        self.ensemble_size = None if ensemble_size is None else int(ensemble_size)
        self.num_chains = int(num_chains)
        self.scheduler = scheduler
        self.max_iterations = (
            _default_max_iterations(method) if max_iterations is None else int(max_iterations)
        )
        self.num_samples = int(num_samples)
        self.eki_variant = "perturbed" if eki_variant is None else eki_variant
        self.aldi = True if aldi is None else bool(aldi)
        self.uki_mode = "tempering" if uki_mode is None else uki_mode
        self.chain_method = chain_method
        self.keep_path = bool(keep_path)
        self.executor = executor
        self.path: dict | None = None
        self.progress_bar = bool(progress_bar)
        if smc_options is not None and not isinstance(smc_options, Mapping):
            raise TypeError(
                "smc_options must be a dict of run_smc tuning keywords, e.g. "
                f"{{'schedule': 'dmc'}}, got {type(smc_options).__name__}."
            )
        self.smc_options = dict(smc_options or {})
        if method == "smc":
            self._check_smc_options(scheduler, keep_path, chain_method)
        if method == "uki" and self.num_chains > 1:
            warn(
                f"num_chains={self.num_chains} with method='uki': UKI is deterministic, so "
                "every chain runs the same sigma-point iteration to the same Gaussian and "
                "differs only in its num_samples draws from it. R-hat across such chains is "
                "1 by construction and tells nothing about the approximation; use "
                "num_chains=1 (num_samples sets the draws), and "
                "eki_infer.gaussian_approximation_check to judge the Gaussian.",
                UserWarning,
            )
        self.blas_threads = None if blas_threads is None else int(blas_threads)
        self.log_evidence = None
        self.problem = None
        self.inference_data = None
        self.history: RunHistory | None = None
        self._samples = None
        self._final_state = None
        self._compiled = {}

    def _check_smc_options(self, scheduler, keep_path, chain_method):
        """Refuses, when the engine is built, the options method='smc' would otherwise
        ignore and any bad ``smc_options`` (named as such)."""
        from eki_infer.smc import check_options

        ignored = {
            "scheduler": (
                scheduler is not None,
                "SMC picks its own tempering steps; pass "
                "smc_options={'schedule': 'dmc'} for the data-misfit controller",
            ),
            "keep_path": (
                keep_path,
                "SMC keeps no ensemble path; its per-stage record is the ensemble_history group",
            ),
            "chain_method": (
                chain_method != "vectorized",
                "SMC runs its chains side by side in one batch",
            ),
        }
        for name, (given, why) in ignored.items():
            if given:
                raise ValueError(f"{name} does not apply to method='smc': {why}.")
        engine_owned = {
            "num_particles": "ensemble_size",
            "num_chains": "num_chains",
            "max_stages": "max_iterations",
            "progress_bar": "progress_bar",
            "checkpoint": "run(..., checkpoint=...)",
        }
        clash = sorted(set(self.smc_options) & set(engine_owned))
        if clash:
            raise ValueError(
                f"smc_options[{clash[0]!r}] is set through the engine's {engine_owned[clash[0]]}."
            )
        names = {"num_particles": "ensemble_size", "max_stages": "max_iterations"}
        try:  # ensemble_size None: the default, a multiple of chain_length chosen at run time
            check_options(
                self.ensemble_size,
                self.num_chains,
                self.max_iterations,
                names=names,
                given=set(self.smc_options),
                **self.smc_options,
            )
        except (TypeError, ValueError) as err:
            # blame smc_options only where the message is about one of the options given
            given = any(name in str(err) for name in self.smc_options)
            where = "smc_options" if given else "method='smc'"
            raise type(err)(f"{where}: {err}") from None

    # ------------------------------------------------------------------ set-up
    def _make_process(self, dim: int):
        if self.method == "uki":
            return _processes.uki(mode=self.uki_mode)
        size = self.ensemble_size or default_ensemble_size(dim)
        if size <= dim:
            warn(
                f"ensemble_size={size} is not larger than the latent dimension d={dim}: "
                "the ensemble spans at most a (J-1)-dimensional subspace, so the posterior "
                "covariance is rank-deficient. Use ensemble_size > d for a full-rank posterior.",
                UserWarning,
            )
        if self.method == "eki":
            return _processes.eki(size, variant=self.eki_variant)
        return _processes.eks(size, aldi=self.aldi)

    def _make_scheduler(self):
        if self.scheduler is None:
            return _schedulers.default_scheduler(
                self.method, mode=self.uki_mode if self.method == "uki" else None
            )
        _schedulers.check_scheduler(self.method, self.scheduler, mode=self.uki_mode)
        return self.scheduler

    # ------------------------------------------------------------------ running
    def run(self, rng_key, *model_args, checkpoint=None, resume: bool = False, **model_kwargs):
        """Runs all chains from the prior to the posterior; returns the ArviZ object
        (``InferenceData`` on arviz 0.x, ``xarray.DataTree`` on arviz 1.x) and keeps it
        as ``self.inference_data``.

        Args:
            rng_key: a JAX PRNG key; the same key gives the same result.
            *model_args, **model_kwargs: the model's arguments, data included.
            checkpoint: a file path: the complete state is written there atomically
                after every iteration (see :mod:`eki_infer.checkpoint`).
            resume: continue from ``checkpoint`` if it exists (same key, model and
                options required); the result equals an uninterrupted run's.
        """
        if resume and checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path to resume from.")
        check_rng_key(rng_key)
        # a run that raises leaves no result of an earlier run behind (only ``history``
        # and ``path`` with what it recorded, for diagnosis)
        self.inference_data = self._samples = self._final_state = None
        self.log_evidence = self.history = self.path = self.problem = None
        with using_executor(self.executor), limited_blas_threads(self.blas_threads):
            # an earlier run's simulator errors must not be quoted for this one
            active_executor().last_errors = {}
            return self._run(rng_key, model_args, model_kwargs, checkpoint, resume)

    def resume(self, rng_key, *model_args, checkpoint, **model_kwargs):
        """Continues the run saved in ``checkpoint`` (``run(..., checkpoint=checkpoint,
        resume=True)``, except that a missing file is an error here: ``run`` with
        ``resume=True`` starts afresh where there is none, which after a crash would
        hide a mistyped path)."""
        if checkpoint is None:
            raise ValueError("resume() needs the checkpoint path to resume from.")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(
                f"no checkpoint at {checkpoint} to resume from; to start a run that "
                "resumes when the file exists, use run(..., checkpoint=path, resume=True)."
            )
        return self.run(rng_key, *model_args, checkpoint=checkpoint, resume=True, **model_kwargs)

    def _run(self, rng_key, model_args, model_kwargs, checkpoint_path, resume):
        problem = trace_model(self.model, *model_args, **model_kwargs)
        self.problem = problem
        if self.method == "smc":
            return self._run_smc(rng_key, problem, checkpoint_path, resume)
        scheduler = self._make_scheduler()
        data, signature, rebuild = split_model_args(problem.model_args, problem.model_kwargs)
        key = None
        if signature is not None:
            config = (self.method, self.ensemble_size, self.eki_variant, self.aldi, self.uki_mode)
            fingerprint = problem.model_fingerprint
            key = (self.model, fingerprint, signature, repr(problem), config, scheduler)
        if key is not None and key in self._compiled:
            process, steps = self._compiled[key]
        else:
            process = self._make_process(problem.dim)
            steps = compile_steps(problem, process, scheduler, rebuild)
            if key is not None:
                self._compiled = {key: (process, steps)}
        if self.chain_method == "vectorized":
            groups = [np.arange(self.num_chains)]
        else:
            groups = [np.array([c]) for c in range(self.num_chains)]
        checkpoint = None
        if checkpoint_path is not None:
            checkpoint = Checkpoint(checkpoint_path, self._fingerprint(rng_key, problem, scheduler))
            if resume:
                checkpoint.load()
        runs = list(checkpoint.finished) if checkpoint is not None else []
        for index in range(len(runs), len(groups)):
            group_run = self._run_chains(
                rng_key, groups[index], problem, process, scheduler, steps, data, checkpoint, index
            )
            if checkpoint is not None:
                checkpoint.save_finished(group_run)
            runs.append(group_run)
        run = _merge_runs(runs)
        if not run.done.all() and _terminates(scheduler):
            warn(
                f"max_iterations={self.max_iterations} reached before the scheduler reached "
                f"its final time (t = {run.t.tolist()}); the ensemble is not yet the T = 1 "
                "posterior approximation. Increase max_iterations.",
                UserWarning,
            )
        if self.method == "eks" and not _terminates(scheduler):
            # (a scheduler that stops at T = 1 has had its own warning for EKS)
            _warn_if_eks_is_short(run.t, self.max_iterations)
        self.history = RunHistory(**run.records)
        self.path = run.path
        self._final_state = run.state
        points = 2 * problem.dim + 1 if self.method == "uki" else run.outputs.shape[1]
        _warn_about_failures(self.method, self.history.num_failed, points, run.failed)
        self.inference_data = self._to_arviz(
            problem,
            run,
            {
                "scheduler": repr(scheduler),
                "chain_meaning": _CHAIN_MEANING[self.method],
            },
        )
        return self.inference_data

    def _keep_partial(self, records, path, num_chains):
        """Keeps what a failed run recorded, for diagnosis, as ``history`` and ``path``."""
        self.history = RunHistory(**_stack_records(records, num_chains))
        if path:
            self.path = {k: np.stack([p[k] for p in path], axis=1) for k in path[0]}

    def _fingerprint(self, rng_key, problem, scheduler) -> tuple:
        """What a checkpoint must match to be resumed by this run."""
        options = (
            self.method,
            self.ensemble_size,
            self.num_chains,
            self.chain_method,
            self.max_iterations,
            self.num_samples,
            self.eki_variant,
            self.aldi,
            self.uki_mode,
            self.keep_path,
        )
        return _named_fingerprint(
            options, repr(scheduler), problem, key_fingerprint(rng_key), "scheduler"
        )

    def _run_chains(
        self, rng_key, chain_ids, problem, process, scheduler, steps, data, checkpoint, group
    ):
        """Runs the chains ``chain_ids`` side by side (vmapped) to termination, resuming
        from ``checkpoint`` when it holds this group's progress."""
        num_chains = len(chain_ids)
        y, noise = problem.observations, problem.noise
        per_chain = chain_keys(rng_key, jnp.asarray(chain_ids))
        states, sched_states = steps.init(fold_keys(per_chain, 0))

        records = {name: [] for name in RunHistory._fields}
        path = []
        evaluations = np.zeros(num_chains, dtype=np.int64)
        runs = 0  # every forward run made, finished chains' and the final evaluation's too
        initial_values = None
        first_iteration, elapsed_before = 0, 0.0
        saved = checkpoint.current if checkpoint is not None else None
        if saved is not None and saved["group"] == group:
            states = jax.tree.map(jnp.asarray, saved["states"])
            sched_states = jax.tree.map(jnp.asarray, saved["sched_states"])
            records = {name: list(rows) for name, rows in saved["records"].items()}
            path = list(saved["path"])
            evaluations = np.asarray(saved["evaluations"]).copy()
            runs = int(saved["runs"])
            initial_values = saved["initial_values"]
            first_iteration, elapsed_before = saved["iteration"], saved["wall_time"]
        start = time.perf_counter() - elapsed_before
        label = self.method.upper() + (f" chain {chain_ids[0]}" if num_chains == 1 else "")
        bar = _progress(self.progress_bar, self.max_iterations, label)
        if bar is not None and first_iteration:
            bar.update(first_iteration)
        divergence_hint = _divergence_hint(self.method, scheduler)
        try:
            for iteration in range(first_iteration, self.max_iterations + 1):
                was_done = np.asarray(sched_states.done)
                points, values, outputs, failed = steps.evaluate(states, data)
                if initial_values is None:
                    initial_values = values
                if self.keep_path:
                    path.append(jax.device_get({"u": points, **values}))
                failed_np = np.asarray(failed)
                evaluations += np.where(was_done, 0, failed_np.shape[1])
                runs += failed_np.size
                if was_done.all() or iteration == self.max_iterations:
                    break
                try:
                    _processes.check_failures(
                        failed_np[~was_done],
                        iteration,
                        chain_ids=np.asarray(chain_ids)[~was_done],
                        points="sigma points" if self.method == "uki" else "ensemble members",
                    )
                except _processes.EnsembleFailureError as error:
                    self._keep_partial(records, path, num_chains)
                    raise _with_simulator_errors(error, active_executor()) from None
                step_keys = fold_keys(per_chain, iteration + 1)
                states, sched_states, dt, stats = steps.advance(
                    step_keys, states, sched_states, outputs, failed, y, noise
                )
                dt = np.asarray(dt)
                bad = ~was_done & ~(np.isfinite(dt) & (dt > 0))
                if bad.any():
                    self._keep_partial(records, path, num_chains)
                    raise SchedulerError(
                        f"{type(scheduler).__name__} gave no usable step at iteration "
                        f"{iteration} (chains {np.asarray(chain_ids)[bad].tolist()}: "
                        f"dt={dt[bad]}). The data misfit is degenerate: all members agree "
                        "exactly or are infinitely far from the data. Check the forward map "
                        "and the noise."
                    )
                misfit_mean, misfit_sd = (np.asarray(s) for s in stats)
                records["t"].append(np.asarray(sched_states.t))
                records["dt"].append(dt)
                records["misfit_mean"].append(misfit_mean)
                records["misfit_sd"].append(misfit_sd)
                records["num_failed"].append(failed_np.sum(axis=1))
                records["forward_evaluations"].append(evaluations.copy())
                records["wall_time"].append(np.full(num_chains, time.perf_counter() - start))
                try:
                    _processes.check_divergence(
                        records["misfit_mean"],
                        problem.data_dim,
                        iteration,
                        active=~was_done,
                        chain_ids=chain_ids,
                        hint=divergence_hint,
                    )
                except _processes.EnsembleDivergenceError:
                    self._keep_partial(records, path, num_chains)
                    raise
                if checkpoint is not None:
                    checkpoint.save_progress(
                        group,
                        {
                            "iteration": iteration + 1,
                            "states": states,
                            "sched_states": sched_states,
                            "records": records,
                            "path": path,
                            "evaluations": evaluations,
                            "runs": runs,
                            "initial_values": initial_values,
                            "wall_time": time.perf_counter() - start,
                        },
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        t=f"{float(np.min(sched_states.t)):.3g}",
                        dt=f"{float(np.max(dt)):.2e}",
                        misfit=f"{float(np.mean(misfit_mean)):.3g}",
                    )
            if bar is not None and bar.n < bar.total:  # done before max_iterations: full
                bar.total = bar.n
                bar.refresh()
        finally:
            if bar is not None:
                bar.close()

        final_keys = fold_keys(per_chain, RESERVED_KEY_INDEX)
        if self.method == "uki":
            # UKI's posterior is the Gaussian N(m, C): draw from it and evaluate the draws
            # once (for the posterior predictive and the log-likelihood).
            samples_u = jax.vmap(process.samples, in_axes=(0, 0, None))(
                final_keys, states, self.num_samples
            )
            values, outputs = steps.transform_and_forward(samples_u, data)
            runs += outputs.shape[0] * outputs.shape[1]
            failed = ~jnp.all(jnp.isfinite(outputs), axis=-1)
            prior_u = jax.vmap(
                lambda k: jax.random.normal(
                    jax.random.fold_in(k, 1), (self.num_samples, problem.dim)
                )
            )(per_chain)
            initial_values = steps.prior_transform(prior_u, data)
        else:
            samples_u = points
        noise_draws = jax.vmap(
            lambda k, n: noise.sample(jax.random.fold_in(k, 7), (n,)), in_axes=(0, None)
        )(final_keys, outputs.shape[1])
        return _ChainRun(
            state=states,
            samples_u=samples_u,
            values=values,
            outputs=outputs,
            failed=failed,
            noise_draws=noise_draws,
            initial_values=initial_values,
            records=_stack_records(records, num_chains),
            path={k: np.stack([p[k] for p in path], axis=1) for k in path[0]} if path else None,
            evaluations=evaluations,
            done=np.asarray(sched_states.done),
            t=np.asarray(sched_states.t),
            runs=np.array([runs], dtype=np.int64),
        )

    # ------------------------------------------------------------------ SMC (method="smc")
    def _run_smc(self, rng_key, problem, checkpoint_path, resume):
        """Tempered SMC (:mod:`eki_infer.smc`): chains are independent SMC runs, draws
        the final equally weighted particles; the per-stage history becomes
        ``ensemble_history`` (dim ``iteration`` = stage) and ``self.history``; the log
        evidence per chain is ``self.log_evidence`` and the ``log_evidence`` attribute
        pools the chains (:func:`eki_infer.smc.pooled_log_evidence`). A checkpoint is
        written after every stage and resumed as for the other methods."""
        from eki_infer.smc import (
            SMCError,
            default_num_particles,
            effective_options,
            pooled_log_evidence,
            predictive_noise_draws,
            run_smc,
        )

        options = effective_options(self.smc_options)
        length = options["chain_length"] if options["waste_free"] else 1
        num = self.ensemble_size or default_num_particles(problem.dim, length)
        if num <= problem.dim:
            warn(
                f"ensemble_size={num} particles for d={problem.dim} latent dimensions: the "
                "population covariance that SMC's moves are drawn with is singular (only "
                "its regularisation moves the particles off a subspace), so the chains mix "
                "slowly and the posterior spread comes out too small. Use many more "
                "particles than d (the default is 1000, or 100 × d beyond d = 10).",
                UserWarning,
            )
        checkpoint = None
        if checkpoint_path is not None:
            fingerprint = _named_fingerprint(
                ("smc", num, self.num_chains, self.max_iterations),
                # the options in effect, defaults included: {} and the defaults written
                # out are the same run
                repr(sorted(options.items())),
                problem,
                key_fingerprint(rng_key),
                "SMC options",
            )
            checkpoint = Checkpoint(checkpoint_path, fingerprint)
            if resume:
                checkpoint.load()
        try:
            result = run_smc(
                problem,
                rng_key,
                num,
                self.num_chains,
                max_stages=self.max_iterations,
                progress_bar=self.progress_bar,
                checkpoint=checkpoint,
                **self.smc_options,
            )
        except SMCError as error:
            # what the stages recorded before the failure, for diagnosis
            self.history = getattr(error, "history", None)
            raise _with_simulator_errors(error, active_executor()) from None
        self.history = result.history
        self.log_evidence = result.log_evidence
        self._final_state = result.state
        _warn_about_smc_failures(result.history.num_failed, result.forward_evaluations)
        transform = jax.jit(problem.prior_transform)
        outputs = jnp.asarray(result.outputs)
        run = _ChainRun(
            state=result.state,
            samples_u=result.particles,
            values=transform(result.particles),
            outputs=outputs,
            failed=~jnp.all(jnp.isfinite(outputs), axis=-1),
            noise_draws=predictive_noise_draws(
                problem.noise, rng_key, self.num_chains, num // length, outputs.shape[1]
            ),
            initial_values=transform(result.initial_particles),
            records=result.history._asdict(),
            path=None,
            evaluations=np.asarray(result.forward_evaluations),
            done=np.ones(self.num_chains, dtype=bool),
            t=np.asarray(result.history.t[:, -1]),
            runs=np.array([result.forward_runs], dtype=np.int64),
        )
        self.inference_data = self._to_arviz(
            problem,
            run,
            {
                "num_stages": int(result.history.t.shape[1]),
                "num_particles": int(num),
                "sequential_rounds": int(result.sequential_rounds),
                "forward_runs": int(result.forward_runs),
                "log_evidence": pooled_log_evidence(result.log_evidence),
                "log_evidence_per_chain": [float(v) for v in result.log_evidence],
                "chain_meaning": "independent SMC run (R-hat compares runs, not Markov chains)",
            },
        )
        return self.inference_data

    # ------------------------------------------------------------------ SMC end

    # ------------------------------------------------------------------ output
    def _to_arviz(self, problem, run, attrs):
        """The ArviZ object of a finished run (any method): ``run`` carries per-chain
        values, outputs, failures, noise draws and the initial draws; the pointwise
        log-likelihood is computed from the outputs and Γ, with no further forward run."""
        y = problem.observations
        residual = run.outputs - y
        misfit = np.asarray(problem.noise.misfit(jnp.where(jnp.isfinite(residual), residual, 0)))
        misfit = np.where(np.asarray(run.failed), np.nan, misfit)
        predictive = problem.unflatten_observations(run.outputs + run.noise_draws)
        log_lik = problem.pointwise_log_likelihood_from_outputs(run.outputs)

        dims = {}
        for site in (*problem.latent_sites, *problem.deterministic_sites, *problem.observed_sites):
            dims[site.name] = list(site.dims)
        self._samples = {k: np.asarray(v) for k, v in run.values.items()}
        return to_arviz(
            posterior=self._samples,
            prior={k: np.asarray(v) for k, v in run.initial_values.items()},
            posterior_predictive={k: np.asarray(v) for k, v in predictive.items()},
            log_likelihood={k: np.asarray(v) for k, v in log_lik.items()},
            observed_data={k: np.asarray(v) for k, v in problem.unflatten_observations(y).items()},
            sample_stats={"data_misfit": misfit, "failed": np.asarray(run.failed)},
            history=self.history._asdict(),
            dims=dims,
            attrs={
                "method": self.method,
                # how the chains ran: with "sequential" each keeps its own wall clock
                "chain_method": self.chain_method,
                "num_iterations": int(self.history.t.shape[1]),
                # the evaluations that drove the updates (SMC: every stage's), as the
                # history counts them
                "forward_evaluations": int(np.sum(run.evaluations))
                if self.method == "smc" or not self.history.forward_evaluations.size
                else int(self.history.forward_evaluations[:, -1].sum()),
                # the final draws' own evaluation, for the predictive and the
                # log-likelihood: EKI's and EKS's last ensemble, UKI's Gaussian draws
                "predictive_evaluations": 0
                if self.method == "smc"
                else int(run.outputs.shape[0] * run.outputs.shape[1]),
                # every forward run the method made: the above, finished chains' points
                # (a vectorized batch evaluates every chain), UKI's last sigma points
                "forward_runs": int(np.sum(run.runs)),
                # the tracer's probe of the model (trace_model), before the method
                "tracing_evaluations": 3 + len(problem.latent_sites),
                **attrs,
            },
        )

    @property
    def final_state(self):
        """The process state after the last update, with a leading chain axis: an
        ``EnsembleState`` (EKI/EKS: the members in whitened space), a ``UKIState`` (UKI:
        the Gaussian's ``mean`` and ``cov`` in whitened space) or the SMC state."""
        if self._final_state is None:
            raise RuntimeError("No state yet: call run() first.")
        return self._final_state

    def get_samples(self, group_by_chain: bool = False) -> dict:
        """Posterior values per site: arrays (num_chains * draws, ...) or, with
        ``group_by_chain``, (num_chains, draws, ...), as NumPyro's ``MCMC.get_samples``."""
        if self._samples is None:
            raise RuntimeError("No samples yet: call run() first.")
        if group_by_chain:
            return dict(self._samples)
        return {k: v.reshape((-1, *v.shape[2:])) for k, v in self._samples.items()}

    def print_summary(self, prob: float = 0.9, exclude_deterministic: bool = True) -> None:
        """Prints mean, sd, quantiles and the between-ensemble R-hat of each latent site.

        With several chains, R-hat compares independent ensembles: values far above 1 mean
        the runs disagree (too small an ensemble, a multimodal posterior), not poor Markov
        mixing, since there is no Markov chain here.
        """
        from numpyro.diagnostics import print_summary

        samples = self.get_samples(group_by_chain=True)
        if exclude_deterministic and self.problem is not None:
            latent = {s.name for s in self.problem.latent_sites}
            samples = {k: v for k, v in samples.items() if k in latent}
        print_summary(samples, prob=prob, group_by_chain=True)

    def posterior_group(self):
        """The posterior as an xarray Dataset, whatever the ArviZ line."""
        return group(self.inference_data, "posterior")


def _data_digest(problem) -> str:
    """SHA-256 of the observations and of the model's arguments: a checkpoint written
    for other data (the problem's repr shows only their shapes) must not be resumed as if
    it were this run's."""
    return digest_leaves(
        jax.tree_util.tree_leaves((problem.observations, problem.model_args, problem.model_kwargs))
    )


def _divergence_hint(method: str, scheduler) -> str:
    """What to do about a diverged ensemble, for the error's message."""
    if method == "eks":
        return (
            f" EKS's drift is explicit, so it is stable only for steps small against the "
            f"data misfit's scale, which {type(scheduler).__name__}'s are not here; "
            "EKSStableScheduler (the default for EKS: Δt = 0.1 / (‖D‖_F + nugget)) keeps "
            "them so."
        )
    return (
        f" Smaller steps than {type(scheduler).__name__}'s (a smaller DefaultScheduler dt, "
        "or the DataMisfitController) keep the update stable."
    )


def _with_simulator_errors(error, executor):
    """Adds the black-box simulator's first error message, when there is one."""
    errors = getattr(executor, "last_errors", None) or {}
    if not errors:
        return error
    member, text = next(iter(errors.items()))
    richer = type(error)(f"{error} First simulator error (member {member}): {text}")
    richer.__dict__.update(error.__dict__)  # e.g. SMCError's partial history
    return richer


def _warn_about_smc_failures(num_failed, forward_evaluations) -> None:
    """Warns where any of an SMC run's forward runs failed, as EKI and EKS do for their
    members (run_smc itself warns where most of a stage's runs fail): SMC gives a failed
    point zero density, so the draws follow the posterior restricted to the region where
    the forward map works, which is the posterior only if the failures lie where it has
    no mass."""
    num_failed = np.asarray(num_failed)
    if not (num_failed.size and num_failed.max() > 0):
        return
    chain, stage = np.unravel_index(np.argmax(num_failed), num_failed.shape)
    warn(
        "SMC: the forward map failed (non-finite output, or a prior whose parameters left "
        f"their range there) for {int(num_failed.sum())} of the run's "
        f"{int(np.sum(forward_evaluations))} forward runs (at most {int(num_failed.max())} "
        f"at a stage: stage {stage} of chain {chain}; history.num_failed has them all). "
        "SMC gives a failed point zero density (a failed prior draw gets zero weight, a "
        "failed proposal is rejected), so where the failures depend on the parameters the "
        "draws follow the posterior restricted to the region where the forward map works.",
        UserWarning,
    )


def _warn_about_failures(method: str, num_failed, points: int, final_failed) -> None:
    """Warns where the forward map failed for most of an iteration's points (the update
    then rests on the few that succeeded), else where it failed for any (failures that
    depend on the parameters truncate the posterior), and where final draws failed:
    those stay in the posterior (for EKI and EKS they are the ensemble; for UKI, draws of
    its Gaussian) with NaN ``log_likelihood`` and ``posterior_predictive``, so
    ``az.loo``/``az.waic`` of the result are NaN; ``sample_stats.failed`` marks them."""
    num_failed = np.asarray(num_failed)
    what = "sigma points" if method == "uki" else "members"
    if num_failed.size and num_failed.max() > points / 2:
        chain, iteration = np.unravel_index(np.argmax(num_failed), num_failed.shape)
        warn(
            f"{method.upper()}: the forward map failed (non-finite output, or a prior whose "
            "parameters left their range for that member) for more than half "
            f"of the {points} {what} at some iteration (worst: {int(num_failed.max())} at "
            f"iteration {iteration} of chain {chain}; history.num_failed has them all). "
            "Each update used only the members that succeeded, so the ensemble describes "
            "the region where the forward map works; check it there.",
            UserWarning,
        )
    elif method != "uki" and num_failed.size and num_failed.max() > 0:
        warn(
            f"{method.upper()}: the forward map failed (non-finite output, or a prior whose "
            "parameters left their range for that member) for "
            f"{int(num_failed.sum())} member evaluations over the run (at most "
            f"{int(num_failed.max())} of {points} at an iteration; history.num_failed has "
            "them all). The updates used the members that succeeded, so where the failures "
            "depend on the parameters the ensemble describes the posterior restricted to "
            "the region where the forward map works.",
            UserWarning,
        )
    if method == "uki" and num_failed.size and num_failed.max() > 0:
        warn(
            f"UKI: the forward map failed for some sigma points (up to {int(num_failed.max())} "
            f"of {points} at an iteration; history.num_failed). UKI drops them and "
            "renormalises the weights of the rest, so along the directions the failed points "
            "spanned the update has no information: the posterior covariance there can "
            "collapse (even to 0). Prefer EKI, EKS or SMC where the forward map fails.",
            UserWarning,
        )
    final_failed = np.asarray(final_failed)
    if final_failed.any():
        per_chain = final_failed.sum(axis=-1).tolist()
        warn(
            f"{method.upper()}: the forward map failed (or a prior's parameters left their "
            f"range) for {per_chain} of the {final_failed.shape[-1]} final draws (per "
            "chain). They stay in the posterior "
            "(the approximation holds them) with NaN log_likelihood and "
            "posterior_predictive, so az.loo/az.waic of this result are NaN; "
            "sample_stats.failed marks them.",
            UserWarning,
        )


class _ChainRun(NamedTuple):
    """What one group of chains leaves behind; arrays have a leading chain axis."""

    state: object
    samples_u: jax.Array
    values: dict
    outputs: jax.Array
    failed: jax.Array
    noise_draws: jax.Array
    initial_values: dict
    records: dict
    path: dict | None
    evaluations: np.ndarray
    done: np.ndarray
    t: np.ndarray
    # every forward run the group's batches made (finished chains' and final draws'
    # included), shape (1,) per chain group
    runs: np.ndarray = np.zeros(1, dtype=np.int64)


def _stack_records(records: dict, num_chains: int) -> dict:
    return {
        name: np.stack(rows, axis=1) if rows else np.zeros((num_chains, 0))
        for name, rows in records.items()
    }


def _pad_history(records: dict, length: int) -> dict:
    """Extends a chain group's history to ``length`` iterations as a finished chain would
    have recorded them in a vectorized run: same t, Δt = 0, no new evaluations."""
    missing = length - records["t"].shape[1]
    if missing == 0:
        return records
    padded = {}
    for name, values in records.items():
        if name in ("dt", "num_failed"):
            tail = np.zeros((values.shape[0], missing), dtype=values.dtype)
        else:
            tail = np.repeat(values[:, -1:], missing, axis=1)
        padded[name] = np.concatenate([values, tail], axis=1)
    return padded


def _pad_path(values: np.ndarray, steps: int) -> np.ndarray:
    """Repeats a finished chain group's last ensemble up to ``steps`` iterations."""
    missing = steps - values.shape[1]
    return np.concatenate([values, np.repeat(values[:, -1:], missing, axis=1)], axis=1)


#: EKS samples the posterior once its dynamics have relaxed: the mean's offset from
#: stationarity decays like e^{−T} in the time T = Σ Δt (rate 1 once C is the posterior
#: covariance, for a Gaussian target), so below T = 2 more than 14 % of the prior's offset
#: is left. The reference models reach T = 3.1-8.9 in the default 200 iterations.
EKS_MIN_TIME = 2.0


def _warn_if_eks_is_short(t, max_iterations: int) -> None:
    """Warns when an EKS run ended before its dynamics could relax (T < 2): its ensemble
    is then still close to its initial (prior) draw, not the posterior, whatever it looks
    like. A too-narrow posterior (tiny noise) makes the stable scheduler's steps tiny."""
    t = np.asarray(t, dtype=float)
    short = np.nonzero(t < EKS_MIN_TIME)[0]
    if short.size:
        warn(
            f"EKS reached time T = {np.round(t[short], 4).tolist()} (chains "
            f"{short.tolist()}) in {max_iterations} iterations: its ensemble relaxes towards "
            f"the posterior like e^(-T), so below T = {EKS_MIN_TIME:g} it still largely "
            "reflects the prior draw. Increase max_iterations (or the scheduler's step), "
            "or use EKI/UKI (which reach the posterior approximation at T = 1) or SMC.",
            UserWarning,
        )


def _merge_runs(runs: list) -> _ChainRun:
    """Concatenates chain groups (sequential chains) along the chain axis."""
    if len(runs) == 1:
        return runs[0]
    length = max(r.records["t"].shape[1] for r in runs)
    records = [_pad_history(r.records, length) for r in runs]
    merged = {
        field: jax.tree.map(lambda *xs: np.concatenate(xs), *[getattr(r, field) for r in runs])
        for field in _ChainRun._fields
        if field not in ("records", "path")
    }
    merged["path"] = None
    if runs[0].path is not None:
        steps = max(r.path["u"].shape[1] for r in runs)
        merged["path"] = {
            name: np.concatenate([_pad_path(r.path[name], steps) for r in runs])
            for name in runs[0].path
        }
    merged["records"] = {
        name: np.concatenate([r[name] for r in records]) for name in RunHistory._fields
    }
    return _ChainRun(**merged)


def _terminates(scheduler) -> bool:
    return getattr(scheduler, "on_terminate", None) == "stop"


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="it", leave=True)

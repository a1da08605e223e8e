"""Schedulers: the data-misfit controller's steps and termination modes, degenerate
steps, the EKS stable step, finished chains, validation, defaults and warnings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _linear import make_problem, run_process

from eki_infer.processes import eki
from eki_infer.schedulers import (
    EKS_DEFAULT_NUMERATOR,
    DataMisfitController,
    DefaultScheduler,
    EKSStableScheduler,
    Scheduler,
    SchedulerState,
    check_scheduler,
    default_scheduler,
)

TRANSFORM = eki(20, "transform")
PROBLEM = make_problem(seed=31, dim=3, data_dim=5, noise="diagonal", shift=30.0)


def test_dmc_steps_sum_to_terminal_time_in_a_run():
    _, info = run_process(TRANSFORM, DataMisfitController(), PROBLEM, jax.random.PRNGKey(0))
    dts = info["dts"]
    assert len(dts) > 2
    assert abs(sum(dts) - 1.0) < 1e-12
    assert float(info["scheduler_state"].t) == 1.0
    assert bool(info["scheduler_state"].done)
    assert int(info["scheduler_state"].iteration) == len(dts)


def test_dmc_first_step_small_when_prior_far_from_data():
    far = make_problem(seed=31, dim=3, data_dim=5, noise="diagonal", shift=300.0)
    _, info = run_process(TRANSFORM, DataMisfitController(), far, jax.random.PRNGKey(0))
    assert info["dts"][0] < 1e-3
    assert info["dts"][-2] > 10 * info["dts"][0]  # steps grow as the data are approached


R0 = np.random.default_rng(7).normal(size=(8, 5)) * 6.0


def drive(sched, iterations):
    """Feeds the scheduler residuals that shrink with t (as an ensemble approaching the
    data does); returns the steps and the final state."""
    step = jax.jit(sched.next)
    state = sched.init()
    dts = []
    for _ in range(iterations):
        r = R0 / jnp.sqrt(1.0 + 5.0 * state.t)
        dt, state = step(state, r, np.ones(8, dtype=bool))
        if float(dt) == 0.0:
            break
        dts.append(float(dt))
    return np.asarray(dts), state


@pytest.mark.parametrize("terminate_at", [1.0, 2.5])
def test_dmc_steps_sum_to_terminal_time(terminate_at):
    dts, state = drive(DataMisfitController(terminate_at=terminate_at), 100)
    assert 2 < len(dts) < 100
    assert abs(dts.sum() - terminate_at) < 1e-12
    assert float(state.t) == terminate_at and bool(state.done)
    assert int(state.iteration) == len(dts)


def test_dmc_step_formula():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(7, 4)) * 3.0
    valid = np.array([True] * 6 + [False])
    r[6] = np.nan
    dt, state = DataMisfitController().next(DataMisfitController().init(), r, valid)
    phi = 0.5 * np.sum(r[:6] ** 2, axis=1)
    q = max(4 / (2 * phi.mean()), np.sqrt(4 / (2 * phi.var(ddof=1))))
    assert float(dt) == pytest.approx(min(q, 1.0), rel=1e-12)
    assert float(state.dt) == float(dt)
    assert float(state.t) == pytest.approx(min(q, 1.0), rel=1e-12)


def test_dmc_step_whose_float32_sum_rounds_to_t_terminates():
    """A q a hair below T − t whose float32 sum with t rounds to T ends the run there
    (else the state sits at t = T, not done, and the next step is a degenerate 0)."""
    controller = DataMisfitController()
    step = jax.jit(lambda st, r: controller.next(st, r, jnp.ones(2, bool)))
    state = SchedulerState(jnp.float32(0.75), jnp.float32(0.1), jnp.int32(1), jnp.bool_(False))
    hits = 0
    residual = np.float32(np.sqrt(8.0))  # q = remaining = 0.25 exactly at √8
    for _ in range(30):
        residual = np.nextafter(residual, np.float32(np.inf))  # q just below 0.25
        dt, new = step(state, jnp.asarray([[0.0], [residual]], jnp.float32))
        assert np.isfinite(float(dt))
        if float(new.t) >= 1.0:
            hits += 1
            assert bool(new.done), (float(dt), float(new.t))
    assert hits > 0  # the rounding case occurred


def test_dmc_continue_goes_past_terminal_time():
    dts, state = drive(DataMisfitController(on_terminate="continue"), 40)
    assert len(dts) == 40
    assert not bool(state.done)
    t = np.cumsum(dts)
    reach = int(np.argmax(t >= 1.0 - 1e-12))
    assert 0 < reach < 30
    assert abs(t[reach] - 1.0) < 1e-12  # the step reaching T is still capped
    assert t[-1] > 1.5
    assert np.all(np.diff(dts[reach + 1 :]) > 0)  # beyond T: the controller's own, growing q


def test_dmc_continue_fixed_repeats_last_step():
    dts, state = drive(DataMisfitController(on_terminate="continue_fixed"), 40)
    assert len(dts) == 40
    t = np.cumsum(dts)
    reach = int(np.argmax(t >= 1.0 - 1e-12))
    assert 0 < reach < 30
    assert abs(t[reach] - 1.0) < 1e-12
    np.testing.assert_array_equal(dts[reach + 1 :], dts[reach])
    assert not bool(state.done)


@pytest.mark.parametrize(
    "case", ["zero-misfit", "all-invalid", "one-valid", "equal-misfits", "nan-rows"]
)
def test_dmc_degenerate_step_is_nan(case):
    r = np.random.default_rng(1).normal(size=(5, 3))
    valid = np.ones(5, dtype=bool)
    if case == "zero-misfit":
        r[:] = 0.0
    elif case == "all-invalid":
        valid[:] = False
    elif case == "one-valid":
        valid[1:] = False
    elif case == "equal-misfits":
        r[:] = r[0]
    else:
        r[:] = np.nan
    sched = DataMisfitController()
    state = sched.init()
    dt, new = jax.jit(sched.next)(state, r, valid)
    assert np.isnan(float(dt))
    assert float(new.t) == 0.0
    assert not bool(new.done)


def test_finished_chain_returns_zero_and_keeps_state():
    r = np.random.default_rng(2).normal(size=(5, 3))
    for sched in (DataMisfitController(), EKSStableScheduler(), DefaultScheduler(0.5)):
        done = SchedulerState(
            jnp.asarray(1.0), jnp.asarray(0.25), jnp.asarray(4, jnp.int32), jnp.asarray(True)
        )
        dt, new = sched.next(done, r, np.ones(5, bool))
        assert float(dt) == 0.0
        for a, b in zip(new, done, strict=True):
            np.testing.assert_array_equal(a, b)


def test_next_is_vmap_able_over_chains_with_mixed_done():
    sched = DataMisfitController()
    r = jnp.asarray(np.random.default_rng(3).normal(size=(3, 6, 4)) * 5)
    base = sched.init()
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, x]), base)
    states = states._replace(done=jnp.array([False, True, False]), t=jnp.array([0.0, 1.0, 0.999]))
    dts, new = jax.jit(jax.vmap(sched.next))(states, r, jnp.ones((3, 6), bool))
    assert float(dts[1]) == 0.0 and bool(new.done[1])
    assert float(dts[2]) == pytest.approx(0.001, rel=1e-9) and bool(new.done[2])
    assert float(new.t[2]) == 1.0
    d0, _ = sched.next(base, r[0], jnp.ones(6, bool))
    assert float(dts[0]) == pytest.approx(float(d0), rel=1e-12)


@pytest.mark.parametrize("shape", [(4, 9), (12, 3)])
def test_eks_stable_step_matches_dense_formula(shape):
    rng = np.random.default_rng(4)
    r = rng.normal(size=shape)
    valid = np.ones(shape[0], dtype=bool)
    valid[0] = False
    r[0] = np.inf
    sched = EKSStableScheduler(numerator=0.3)
    dt, state = jax.jit(sched.next)(sched.init(), r, valid)
    rv = r[1:]
    dmat = rv @ (rv - rv.mean(0)).T / len(rv)  # D[j, k] = 1/n <r_k − r̄, r_j>
    expected = 0.3 / (np.linalg.norm(dmat) + sched.nugget)
    assert float(dt) == pytest.approx(expected, rel=1e-12)
    assert float(state.t) == pytest.approx(expected, rel=1e-12)
    assert not bool(state.done)


def test_default_scheduler_is_constant():
    sched = DefaultScheduler(0.25)
    state = sched.init()
    for _ in range(3):
        dt, state = sched.next(state, jnp.zeros((3, 2)), jnp.ones(3, bool))
        assert float(dt) == 0.25
    assert float(state.t) == 0.75 and int(state.iteration) == 3 and not bool(state.done)
    assert np.isnan(float(sched.init().dt))


def test_options_are_validated():
    with pytest.raises(ValueError, match="on_terminate"):
        DataMisfitController(on_terminate="halt")
    with pytest.raises(ValueError, match="terminate_at"):
        DataMisfitController(terminate_at=0.0)
    with pytest.raises(ValueError, match="terminate_at"):
        DataMisfitController(terminate_at=float("nan"))
    with pytest.raises(ValueError, match="numerator"):
        EKSStableScheduler(numerator=-1.0)
    with pytest.raises(ValueError, match="nugget"):
        EKSStableScheduler(nugget=-1e-3)
    with pytest.raises(ValueError, match="dt"):
        DefaultScheduler(0.0)
    with pytest.raises(ValueError, match="dt"):
        DefaultScheduler(float("inf"))


def test_schedulers_are_hashable_static_arguments():
    scheds = [DataMisfitController(), EKSStableScheduler(0.1), DefaultScheduler(2.0)]
    assert len({*scheds, DataMisfitController()}) == 3
    f = jax.jit(lambda s, r, v, sched: sched.next(s, r, v), static_argnums=3)
    dt, _ = f(
        DefaultScheduler(2.0).init(), jnp.zeros((3, 2)), jnp.ones(3, bool), DefaultScheduler(2.0)
    )
    assert float(dt) == 2.0


def test_defaults_and_warning():
    assert default_scheduler("eki") == DataMisfitController()
    assert default_scheduler("uki") == DataMisfitController()
    assert default_scheduler("uki", mode="iterative") == DefaultScheduler(1.0)
    eks_default = default_scheduler("eks")
    assert isinstance(eks_default, EKSStableScheduler)
    assert eks_default.numerator == EKS_DEFAULT_NUMERATOR
    with pytest.raises(ValueError, match="method"):
        default_scheduler("mcmc")
    with pytest.warns(UserWarning, match="long-time"):
        check_scheduler("eks", DataMisfitController())
    with pytest.raises(TypeError, match="Scheduler"):
        check_scheduler("eki", 0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_scheduler("eki", DataMisfitController())
        check_scheduler("eks", eks_default)
    assert isinstance(eks_default, Scheduler)


def test_state_types_are_stable_across_steps():
    # identical avals before and after a step: a jitted loop compiles once
    r = jnp.asarray(np.random.default_rng(9).normal(size=(5, 3)))
    for sched in (DataMisfitController(), EKSStableScheduler(), DefaultScheduler()):
        state = sched.init()
        _, new = sched.next(state, r, jnp.ones(5, bool))
        for a, b in zip(state, new, strict=True):
            assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)

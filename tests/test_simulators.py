"""Black-box simulators: same posterior as the JAX forward map, every executor, injected
failures survived and counted, clear errors, NUTS refused, and kill-and-resume."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from eki_infer import EKIInference, EnsembleFailureError
from eki_infer.convert import group
from eki_infer.executors import DaskExecutor, ProcessExecutor, SerialExecutor, ThreadExecutor
from eki_infer.nuts import run_nuts
from eki_infer.schedulers import DefaultScheduler
from eki_infer.simulators import BlackBoxGradientError, black_box
from tests import _black_box_models as bbm

Y = bbm.observations()
ROOT = Path(__file__).resolve().parent.parent


def run_engine(model, executor=None, ensemble_size=40, num_chains=2, **options):
    engine = EKIInference(
        model,
        "eki",
        ensemble_size=ensemble_size,
        num_chains=num_chains,
        executor=executor,
        progress_bar=False,
        **options,
    )
    engine.run(jax.random.PRNGKey(0), y=Y)
    return engine


@pytest.fixture(scope="module")
def jax_run():
    return run_engine(bbm.make_model())


def assert_same_posterior(a, b):
    for name in ("rate", "scale"):
        np.testing.assert_allclose(
            a.get_samples()[name], b.get_samples()[name], rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(a.history.t, b.history.t, rtol=1e-12)


def test_black_box_matches_jax_forward_map(jax_run):
    engine = run_engine(bbm.make_model(bbm.decay_numpy))
    assert_same_posterior(jax_run, engine)


@pytest.mark.parametrize("make_executor", [SerialExecutor, lambda: ThreadExecutor(max_workers=2)])
def test_executors_agree(jax_run, make_executor):
    with make_executor() as executor:
        engine = run_engine(bbm.make_model(bbm.decay_numpy), executor)
    assert_same_posterior(jax_run, engine)


def test_process_pool_executor(jax_run):
    with ProcessExecutor(max_workers=2) as executor:
        engine = run_engine(bbm.make_model(bbm.decay_numpy), executor)
    assert_same_posterior(jax_run, engine)


def test_dask_local_cluster_two_workers(jax_run):
    pytest.importorskip("distributed")
    with DaskExecutor(n_workers=2) as executor:
        engine = run_engine(bbm.make_model(bbm.decay_numpy), executor)
    assert_same_posterior(jax_run, engine)


def test_dask_in_process_cluster_starts():
    """processes=False: an in-process cluster (inproc://), which refuses a host."""
    pytest.importorskip("distributed")
    members = [(np.float64(1.0), np.float64(1.0)), (np.float64(1.5), np.float64(0.5))]
    with DaskExecutor(n_workers=1, processes=False) as executor:
        outputs, failed = executor.map(bbm.decay_numpy, members, bbm.TIMES.shape, np.float64)
    assert not failed.any()
    np.testing.assert_allclose(outputs[1], bbm.decay_numpy(1.5, 0.5))


def test_a_member_that_ends_its_process_does_not_break_the_next_batch():
    """A member that kills its worker breaks the process pool: it fails (with the members
    sharing that pool at the time) and a fresh pool serves the next batch."""
    members = [(np.float64(r), np.float64(1.0)) for r in (0.5, 1.0, 3.0, 1.5)]
    with ProcessExecutor(max_workers=2) as executor:
        _, failed = executor.map(bbm.ends_its_process, members, bbm.TIMES.shape, np.float64)
        assert failed[2] and "worker process died" in executor.last_errors[2]
        outputs, failed = executor.map(
            bbm.ends_its_process, members[:2], bbm.TIMES.shape, np.float64
        )
    assert not failed.any()
    np.testing.assert_allclose(outputs[1], bbm.decay_numpy(1.0, 1.0))


def test_an_earlier_runs_simulator_error_is_not_quoted():
    """The first simulator error quoted in a failure is this run's, not a previous one's."""
    with pytest.raises(EnsembleFailureError, match="license server unreachable"):
        run_engine(bbm.make_model(bbm.always_failing), ensemble_size=10, num_chains=1)

    def model(y=None):  # a pure-JAX forward map that is NaN everywhere
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
        numpyro.sample("y", dist.Normal(rate * jnp.nan, 0.05).expand([12]).to_event(1), obs=y)

    with pytest.raises(EnsembleFailureError) as error:
        run_engine(model, ensemble_size=10, num_chains=1)
    assert "license server" not in str(error.value)


def test_nuts_refuses_black_box_model():
    with pytest.raises(BlackBoxGradientError, match=r"decay_numpy.*no derivatives"):
        run_nuts(
            bbm.make_model(bbm.decay_numpy), jax.random.PRNGKey(0), y=Y, num_warmup=5, num_samples=5
        )


def test_injected_failures_are_survived_and_counted():
    engine = run_engine(bbm.make_model(bbm.flaky_decay_numpy), ensemble_size=60, num_chains=1)
    samples = engine.get_samples()
    assert np.isfinite(samples["rate"]).all()
    failures = engine.history.num_failed
    assert failures.sum() > 0  # about a fifth of the members fail at every iteration
    assert (failures < 60 - 2).all()
    stats = group(engine.inference_data, "sample_stats")
    failed = stats["failed"].values
    misfit = stats["data_misfit"].values
    assert np.isnan(misfit[failed]).all() and np.isfinite(misfit[~failed]).all()
    history = group(engine.inference_data, "ensemble_history")
    np.testing.assert_array_equal(history["num_failed"].values, failures)
    # the posterior is still the posterior: close to the run without failures
    reference = run_engine(bbm.make_model(), ensemble_size=60, num_chains=1)
    rate, ref = samples["rate"], reference.get_samples()["rate"]
    assert abs(rate.mean() - ref.mean()) < 0.5 * ref.std()


def test_all_members_failing_names_the_iteration_and_the_error():
    with pytest.raises(EnsembleFailureError, match=r"Iteration 0.*license server unreachable"):
        run_engine(bbm.make_model(bbm.always_failing), ensemble_size=10, num_chains=1)


def test_timeouts_fail_members():
    def sometimes_hangs(rate, scale):
        if float(rate) > 1.5:
            time.sleep(1.0)
        return bbm.decay_numpy(rate, scale)

    with ThreadExecutor(max_workers=4, timeout=0.3) as executor:
        engine = run_engine(
            bbm.make_model(sometimes_hangs),
            executor,
            ensemble_size=12,
            num_chains=1,
            scheduler=DefaultScheduler(0.5),
            max_iterations=2,
        )
    assert engine.history.num_failed[0, 0] > 0
    assert np.isfinite(engine.get_samples()["rate"]).all()


def test_black_box_output_shape_is_checked():
    wrong = black_box(lambda rate, scale: np.zeros(3), output_shape=bbm.TIMES.shape)
    outputs, failed = SerialExecutor().map(
        lambda r, s: np.zeros(3), [(1.0, 1.0)], bbm.TIMES.shape, np.float64
    )
    assert failed.all() and np.isnan(outputs).all()
    assert callable(wrong)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpyro
    numpyro.enable_x64()
    import jax
    sys.path.insert(0, {root!r})
    from eki_infer import EKIInference
    from eki_infer.schedulers import DefaultScheduler
    from tests import _black_box_models as bbm

    engine = EKIInference(bbm.make_model(bbm.slow_decay_numpy), "eki", ensemble_size=20,
                          num_chains=2, scheduler=DefaultScheduler(0.05), max_iterations=20,
                          progress_bar=False)
    engine.run(jax.random.PRNGKey(3), y=bbm.observations(), checkpoint={path!r})
    """
)


def _checkpoint_iteration(path):
    try:
        with open(path, "rb") as f:
            current = pickle.loads(pickle.load(f)["payload"])["current"]
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        return -1
    return -1 if current is None else current["iteration"]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(root=str(ROOT), path=str(checkpoint)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path)
    deadline = time.time() + 240
    while _checkpoint_iteration(checkpoint) < 4:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _checkpoint_iteration(checkpoint)
    assert 4 <= killed_at < 20

    def engine():
        return EKIInference(
            bbm.make_model(bbm.slow_decay_numpy),
            "eki",
            ensemble_size=20,
            num_chains=2,
            scheduler=DefaultScheduler(0.05),
            max_iterations=20,
            progress_bar=False,
        )

    resumed = engine()
    resumed.resume(jax.random.PRNGKey(3), y=bbm.observations(), checkpoint=checkpoint)
    uninterrupted = engine()
    uninterrupted.run(jax.random.PRNGKey(3), y=bbm.observations())
    for name in ("rate", "scale"):
        np.testing.assert_array_equal(
            resumed.get_samples()[name], uninterrupted.get_samples()[name]
        )
    np.testing.assert_array_equal(resumed.history.t, uninterrupted.history.t)
    np.testing.assert_array_equal(
        resumed.history.forward_evaluations, uninterrupted.history.forward_evaluations
    )


def test_resume_refuses_another_run(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    run_engine(bbm.make_model(), num_chains=1, ensemble_size=10).run(
        jax.random.PRNGKey(0), y=Y, checkpoint=checkpoint
    )
    other = EKIInference(bbm.make_model(), "eki", ensemble_size=11, progress_bar=False)
    with pytest.raises(ValueError, match=r"different run \(it differs in its method and options\)"):
        other.run(jax.random.PRNGKey(0), y=Y, checkpoint=checkpoint, resume=True)


@pytest.mark.parametrize(
    ("output", "shape", "dtype", "error"),
    [
        (1.0, (8,), np.float64, "returned shape (), declared (8,)"),  # not broadcast
        (np.zeros(3), (8,), np.float64, "returned shape (3,), declared (8,)"),
        (None, (2,), np.float64, "returned None"),
        (np.ones(2) * 1j, (2,), np.float64, "returned complex values"),
        (np.array(["a", "b"]), (2,), np.float64, "non-numeric"),
        (np.full(2, 1e300), (2,), np.float32, "beyond the range of float32"),
        (np.array([1.0, np.nan]), (2,), np.float64, "returned NaN or inf"),
    ],
)
def test_wrong_simulator_outputs_fail_the_member(output, shape, dtype, error):
    executor = SerialExecutor()
    outputs, failed = executor.map(lambda: output, [()], shape, dtype)
    assert failed.all() and np.isnan(outputs).all()
    assert error in executor.last_errors[0]


def test_wrong_simulator_outputs_are_named():
    executor = SerialExecutor()
    executor.map(lambda: 1.0, [()], (8,), np.float64)
    assert executor.last_errors == {0: "returned shape (), declared (8,)"}
    # the same entries in another layout are accepted
    outputs, failed = executor.map(lambda: np.ones((4, 1)), [()], (4,), np.float64)
    assert not failed.any() and outputs.shape == (1, 4)


def test_timeout_counts_a_members_own_running_time():
    """Ten members of 0.2 s on two threads take a second in all, but none runs longer
    than its 0.5 s timeout: none fails (waiting for a worker does not count)."""

    def member(x):
        time.sleep(0.2)
        return np.array([x])

    with ThreadExecutor(max_workers=2, timeout=0.5) as executor:
        outputs, failed = executor.map(member, [(float(i),) for i in range(10)], (1,), np.float64)
    assert not failed.any()
    np.testing.assert_array_equal(outputs[:, 0], np.arange(10.0))


def test_a_hung_process_member_is_killed_and_the_pool_renewed():
    executor = ProcessExecutor(max_workers=1, timeout=0.5)
    # a first batch starts the worker (its start-up does not count against the timeout)
    outputs, failed = executor.map(abs, [(-2.0,), (3.0,)], (1,), np.float64)
    assert not failed.any() and outputs[:, 0].tolist() == [2.0, 3.0]
    start = time.perf_counter()
    _, failed = executor.map(time.sleep, [(60.0,)], (1,), np.float64)
    assert failed.all() and "did not finish" in executor.last_errors[0]
    assert time.perf_counter() - start < 30  # not the 60 s the member would take
    assert executor._pool is None  # terminated; the next batch gets a fresh pool
    outputs, failed = executor.map(abs, [(-1.0,)], (1,), np.float64)
    assert not failed.any() and outputs[0, 0] == 1.0
    executor.close()


def test_executor_and_black_box_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="SerialExecutor cannot enforce a timeout"):
        SerialExecutor(timeout=1.0)
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        black_box(lambda x: x, output_shape=(3,), dtype=np.int32)

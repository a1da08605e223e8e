"""Executors: how a batch of black-box simulator calls is spread over workers.

A black-box simulator (see :func:`eki_infer.simulators.black_box`) is called once per
iteration with the whole ensemble; the active executor maps it over the members:

- :class:`SerialExecutor` — one member after another in this process (the default);
- :class:`ThreadExecutor` — a thread pool (simulators that release the GIL: NumPy,
  compiled extensions, subprocesses, I/O);
- :class:`ProcessExecutor` — a process pool (pure-Python simulators; the function must
  be picklable, i.e. defined at module level);
- :class:`DaskExecutor` — ``dask.distributed``, members as tasks, on a ``Client`` you
  pass or a ``LocalCluster`` started (and closed) for you.

The executor is an option of :class:`~eki_infer.EKIInference`, not of the model: the
same model runs serially in a notebook and on a cluster in production.

Every executor returns, for a batch of n members, the outputs (n, *shape) and a boolean
failure flag per member. A member fails when the simulator raises, returns something of
the wrong shape, returns NaN/inf, or (with ``timeout``) takes longer than ``timeout``
seconds; its output row is NaN, and the process's failure policy takes over (failed
members are redrawn from the successful ones; see ALGORITHMS.md §6). A timed-out thread
or process task cannot be interrupted: it runs on, but its result is ignored.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import threading
import warnings
from contextlib import contextmanager

import numpy as np

__all__ = [
    "DaskExecutor",
    "Executor",
    "ProcessExecutor",
    "SerialExecutor",
    "ThreadExecutor",
    "active_executor",
    "using_executor",
]


def _call_member(fn, member_args, shape, dtype):
    """Runs one member; returns (output, error message or None)."""
    try:
        out = np.asarray(fn(*member_args), dtype=dtype)
    except Exception as error:  # a failing simulator must not stop the ensemble
        return None, f"{type(error).__name__}: {error}"
    if out.shape != shape:
        try:
            out = np.broadcast_to(out, shape)
        except ValueError:
            return None, f"returned shape {out.shape}, declared {shape}"
    if not np.all(np.isfinite(out)):
        return None, "returned NaN or inf"
    return out, None


def _collect(futures, done, timeout):
    """Per-member (output, error) from futures; unfinished ones are cancelled and fail
    as timed out, and a future that raised (a worker died, a result could not be
    deserialised) fails with its error."""
    results = []
    for future in futures:
        if future not in done:
            future.cancel()
            results.append((None, f"timed out after {timeout} s"))
            continue
        try:
            results.append(future.result())
        except Exception as error:
            results.append((None, f"{type(error).__name__}: {error}"))
    return results


class Executor:
    """Maps a simulator over the members of a batch. Subclasses implement ``_submit_all``.

    Attributes:
        timeout: seconds a member may take before it is declared failed (None: no limit).
        last_errors: the error messages of the last batch's failed members (index → text),
            for diagnosis.
    """

    def __init__(self, timeout: float | None = None):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}.")
        self.timeout = timeout
        self.last_errors: dict[int, str] = {}

    def map(self, fn, batch_args, shape, dtype):
        """``batch_args``: a list of n tuples of per-member NumPy arguments. Returns
        (outputs (n, *shape) with NaN rows for failures, failed (n,) bool)."""
        n = len(batch_args)
        outputs = np.full((n, *shape), np.nan, dtype=dtype)
        failed = np.ones(n, dtype=bool)
        self.last_errors = {}
        for i, (out, error) in enumerate(self._run_all(fn, batch_args, shape, dtype)):
            if error is None:
                outputs[i] = out
                failed[i] = False
            else:
                self.last_errors[i] = error
        return outputs, failed

    def _run_all(self, fn, batch_args, shape, dtype):
        raise NotImplementedError

    def close(self) -> None:
        """Releases pools and clusters this executor started."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialExecutor(Executor):
    """Members one after another in the calling process (``timeout`` is not enforced)."""

    def _run_all(self, fn, batch_args, shape, dtype):
        return [_call_member(fn, args, shape, dtype) for args in batch_args]


class _PoolExecutor(Executor):
    """Shared logic of the concurrent.futures pools."""

    pool_class = None

    def __init__(self, max_workers: int | None = None, timeout: float | None = None):
        super().__init__(timeout)
        self.max_workers = max_workers
        self._pool = None

    def _make_pool(self):
        return self.pool_class(max_workers=self.max_workers)

    def _ensure_pool(self):
        if self._pool is None:
            self._pool = self._make_pool()
        return self._pool

    def _run_all(self, fn, batch_args, shape, dtype):
        pool = self._ensure_pool()
        futures = [pool.submit(_call_member, fn, args, shape, dtype) for args in batch_args]
        done, _ = cf.wait(futures, timeout=self.timeout)
        return _collect(futures, done, self.timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ThreadExecutor(_PoolExecutor):
    """A thread pool of ``max_workers`` threads."""

    pool_class = cf.ThreadPoolExecutor


class ProcessExecutor(_PoolExecutor):
    """A process pool of ``max_workers`` processes (the simulator must be picklable).

    Workers are started with "spawn", never "fork": forking a process that runs JAX's
    threads can deadlock.
    """

    pool_class = cf.ProcessPoolExecutor

    def _make_pool(self):
        return self.pool_class(
            max_workers=self.max_workers, mp_context=multiprocessing.get_context("spawn")
        )


class DaskExecutor(Executor):
    """Members as ``dask.distributed`` tasks.

    Args:
        client: a ``distributed.Client``; if None, a ``LocalCluster`` with ``n_workers``
            single-threaded worker processes on loopback is started on first use and
            closed by :meth:`close`.
        n_workers: workers of the LocalCluster started for you.
        timeout: per-batch seconds after which unfinished members fail.
    """

    def __init__(self, client=None, n_workers: int = 2, timeout: float | None = None, **cluster):
        super().__init__(timeout)
        self.client = client
        self.n_workers = n_workers
        self._cluster_options = cluster
        self._owned = None

    def _ensure_client(self):
        if self.client is None:
            from distributed import Client, LocalCluster

            cluster = LocalCluster(
                n_workers=self.n_workers,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=None,
                **self._cluster_options,
            )
            self.client = Client(cluster)
            self._owned = cluster
        return self.client

    def _run_all(self, fn, batch_args, shape, dtype):
        from distributed import wait

        client = self._ensure_client()
        # one function object for the whole batch: Dask serialises it once, not per task
        member = functools.partial(_call_member, fn, shape=shape, dtype=dtype)
        futures = client.map(member, batch_args, pure=False)
        try:
            wait(futures, timeout=self.timeout)
        except TimeoutError:  # distributed.wait raises instead of returning the done ones
            pass
        return _collect(futures, {f for f in futures if f.done()}, self.timeout)

    def close(self) -> None:
        if self._owned is not None:
            self.client.close()
            self._owned.close()
            self.client, self._owned = None, None


_ACTIVE = {"executor": None}
_LOCK = threading.Lock()


def active_executor() -> Executor:
    """The executor black-box simulators use right now (serial outside any run)."""
    executor = _ACTIVE["executor"]
    return executor if executor is not None else _SERIAL


@contextmanager
def using_executor(executor: Executor | None):
    """Makes ``executor`` the active one for the duration of the block."""
    if executor is None:
        yield
        return
    with _LOCK:
        previous = _ACTIVE["executor"]
        if previous is not None and previous is not executor:
            warnings.warn(
                "another executor is already active (a run inside a run?); nesting them",
                RuntimeWarning,
                stacklevel=3,
            )
        _ACTIVE["executor"] = executor
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE["executor"] = previous


_SERIAL = SerialExecutor()

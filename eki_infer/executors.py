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
the wrong size (an output with the declared number of entries is reshaped; a scalar is
not broadcast), complex values, None or NaN/inf, or (with ``timeout``) runs longer than
``timeout`` seconds itself (its own running time, not the time it waited for a worker);
its output row is NaN, and the method's failure policy takes over (EKI and EKS redraw
failed members from the successful ones, UKI drops failed sigma points, SMC rejects
failed proposals; see ALGORITHMS.md §6).

A member still unfinished when the batch's deadline passes (``timeout`` times the number
of rounds the batch needs on the workers, plus one; a new process pool's first batch
also gets 20 s to start its workers) fails as not finished in time; so do members still
queued behind hung ones, which hold their workers until then. A Python thread cannot be
stopped: a hung member keeps its thread, and the pool's other members wait for the rest.
:class:`ProcessExecutor` instead terminates its worker processes when a member times out
(a fresh pool serves the next batch) and in :meth:`~Executor.close`, so prefer it for
simulators that can hang. A member that ends its worker process (a crash in compiled
code, ``os._exit``) breaks a process pool: it fails together with the members queued or
running in that pool at the time, and a fresh pool serves the next batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import math
import multiprocessing
import threading
import time
from contextlib import contextmanager

import numpy as np

from eki_infer.user_warnings import warn

__all__ = [
    "DaskExecutor",
    "Executor",
    "ProcessExecutor",
    "SerialExecutor",
    "ThreadExecutor",
    "active_executor",
    "using_executor",
]


def _call_member(fn, member_args, shape, dtype, timeout=None):
    """Runs one member; returns (output, error message or None). The member's own
    running time counts against ``timeout``."""
    start = time.perf_counter()
    try:
        raw = fn(*member_args)
    except Exception as error:  # a failing simulator must not stop the ensemble
        return None, f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    if timeout is not None and seconds > timeout:
        return None, f"timed out: ran {seconds:.3g} s, more than timeout={timeout} s"
    if raw is None:
        return None, "returned None"
    try:
        out = np.asarray(raw)
    except Exception as error:
        return None, f"returned something that is not an array ({type(error).__name__})"
    if np.iscomplexobj(out):
        return None, "returned complex values"
    if not (np.issubdtype(out.dtype, np.number) or out.dtype == np.bool_):
        return None, f"returned non-numeric values (dtype {out.dtype})"
    if out.shape != shape:
        if out.size != math.prod(shape):
            return None, f"returned shape {out.shape}, declared {shape}"
        out = out.reshape(shape)  # same entries, other layout: (1,) for (), (8, 1) for (8,)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = out.astype(dtype)
    if not np.all(np.isfinite(cast)):
        if np.all(np.isfinite(out)):
            return None, f"returned values beyond the range of {np.dtype(dtype).name}"
        return None, "returned NaN or inf"
    return cast, None


#: Extra seconds the first batch of a new process pool may take: spawning workers that
#: import NumPy, JAX and the simulator's modules is not the members' running time.
_POOL_START_ALLOWANCE = 20.0


def _rounds_deadline(timeout, members, workers, allowance=0.0):
    """Seconds to wait for a batch: ``timeout`` for each round of members the workers
    run one after another, plus one round of slack (scheduling) and ``allowance``."""
    if timeout is None:
        return None
    return timeout * (math.ceil(members / max(int(workers or 1), 1)) + 1) + allowance


def _broke(future) -> bool:
    """Whether ``future`` failed because its pool broke (a worker process died)."""
    return (
        future.done()
        and not future.cancelled()
        and isinstance(future.exception(), cf.BrokenExecutor)
    )


def _collect(futures, done, timeout):
    """Per-member (output, error) from futures; unfinished ones are cancelled and fail
    as timed out, and a future that raised (a worker died, a result could not be
    deserialised) fails with its error."""
    results = []
    for future in futures:
        if future not in done:
            future.cancel()
            results.append(
                (None, f"did not finish within the batch's deadline (timeout={timeout} s)")
            )
            continue
        try:
            results.append(future.result())
        except cf.BrokenExecutor as error:
            results.append(
                (
                    None,
                    f"{type(error).__name__}: a worker process died while this member was "
                    "queued or running (this member, or another one in the same pool, ended "
                    "its process, e.g. a crash in compiled code); the pool is renewed for "
                    "the next batch",
                )
            )
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
    """Members one after another in the calling process. It takes no ``timeout``: a
    running member cannot be stopped here (use :class:`ProcessExecutor` for that)."""

    def __init__(self, timeout: float | None = None):
        if timeout is not None:
            raise ValueError(
                "SerialExecutor cannot enforce a timeout (a member runs in this process "
                "and cannot be stopped); use ThreadExecutor or ProcessExecutor(timeout=...)."
            )
        super().__init__()

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

    #: seconds a new pool's first batch may take on top of the members' time
    start_allowance = 0.0

    def _ensure_pool(self):
        if self._pool is None:
            self._pool = self._make_pool()
            self._fresh = True
        return self._pool

    def _run_all(self, fn, batch_args, shape, dtype):
        try:
            futures = self._submit(fn, batch_args, shape, dtype)
        except cf.BrokenExecutor:  # a worker died after the last batch: start a fresh pool
            self._after_broken()
            futures = self._submit(fn, batch_args, shape, dtype)
        workers = getattr(self._pool, "_max_workers", None)
        allowance = self.start_allowance if getattr(self, "_fresh", False) else 0.0
        deadline = _rounds_deadline(self.timeout, len(futures), workers, allowance)
        done, pending = cf.wait(futures, timeout=deadline)
        self._fresh = False
        results = _collect(futures, done, self.timeout)
        if pending:
            self._after_timeout()
        elif any(_broke(future) for future in futures):
            self._after_broken()
        return results

    def _submit(self, fn, batch_args, shape, dtype):
        pool = self._ensure_pool()
        return [
            pool.submit(_call_member, fn, args, shape, dtype, self.timeout) for args in batch_args
        ]

    def _after_timeout(self) -> None:
        """What to do with members still running past the deadline (threads: nothing
        can be done)."""

    def _after_broken(self) -> None:
        """A worker died (a process pool's member ended its process, e.g. a crash in
        compiled code): the pool is unusable, so a fresh one serves the next batch."""
        self.close()

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
    start_allowance = _POOL_START_ALLOWANCE

    def _make_pool(self):
        return self.pool_class(
            max_workers=self.max_workers, mp_context=multiprocessing.get_context("spawn")
        )

    def _terminate(self) -> None:
        """Stops the pool and kills its worker processes (hung members included)."""
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=5)
        self._pool = None

    def _after_timeout(self) -> None:
        self._terminate()  # a fresh pool serves the next batch

    def close(self) -> None:
        self._terminate()


class DaskExecutor(Executor):
    """Members as ``dask.distributed`` tasks.

    Args:
        client: a ``distributed.Client``; if None, a ``LocalCluster`` with ``n_workers``
            single-threaded worker processes on loopback is started on first use and
            closed by :meth:`close`.
        n_workers: workers of the LocalCluster started for you.
        timeout: seconds a member may run (see the module docstring for the batch's
            deadline).
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

            options = {"threads_per_worker": 1, "dashboard_address": None}
            if self._cluster_options.get("processes", True):
                # worker processes talk over TCP: keep it on loopback (an in-process
                # cluster, processes=False, uses inproc:// and refuses a host)
                options["host"] = "127.0.0.1"
            cluster = LocalCluster(n_workers=self.n_workers, **(options | self._cluster_options))
            self.client = Client(cluster)
            self._owned = cluster
        return self.client

    def _run_all(self, fn, batch_args, shape, dtype):
        from distributed import wait

        client = self._ensure_client()
        # one function object for the whole batch: Dask serialises it once, not per task
        member = functools.partial(_call_member, fn, shape=shape, dtype=dtype, timeout=self.timeout)
        futures = client.map(member, batch_args, pure=False)
        workers = sum(client.nthreads().values()) or 1
        try:
            wait(futures, timeout=_rounds_deadline(self.timeout, len(futures), workers))
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
            warn(
                "another executor is already active (a run inside a run?); nesting them",
                RuntimeWarning,
            )
        _ACTIVE["executor"] = executor
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE["executor"] = previous


_SERIAL = SerialExecutor()

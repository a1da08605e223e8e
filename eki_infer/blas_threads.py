"""Thread count of the BLAS/LAPACK library behind XLA's CPU linear algebra, during a run.

On CPU, jaxlib runs its factorisations (Cholesky, eigh, SVD, triangular solves) through
SciPy's LAPACK, i.e. SciPy's bundled OpenBLAS. OpenBLAS keeps one worker thread per core
and, after every call, lets them spin for a while waiting for more work. An ensemble
step makes only small (J × J or min(J, M)) factorisations, which gain nothing from
those threads, and the spinning threads then take the cores from the next forward
evaluation, which XLA parallelises itself. Measured with ``benchmarks/engine_overhead.py``
on a 2-core machine: a 14 ms batched forward evaluation took 25-30 ms right after an EKI
update, and 15-20 ms with OpenBLAS limited to one thread.

:func:`limited_blas_threads` limits OpenBLAS (and any other BLAS that ``threadpoolctl``
finds) for the duration of a ``with`` block and restores the previous setting after it,
so the rest of the user's process is left as it was.
"""

from __future__ import annotations

import contextlib

__all__ = ["limited_blas_threads"]


@contextlib.contextmanager
def limited_blas_threads(num_threads: int | None):
    """Limits BLAS threads to ``num_threads`` inside the block; ``None`` changes nothing."""
    if num_threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(num_threads), user_api="blas"):
        yield

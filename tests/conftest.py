"""Test-wide settings: float64 everywhere (the exactness tests need it), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA thread per test process: pytest-xdist already runs one process per core, and a
# multi-threaded CPU executor inside each was seen to deadlock intermittently (a worker
# idle forever inside a compiled SMC move) on this 2-core machine.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import numpyro

numpyro.enable_x64()

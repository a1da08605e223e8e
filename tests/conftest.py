"""Test-wide settings: float64 everywhere (the exactness tests need it), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpyro

numpyro.enable_x64()

"""eki_infer: derivative-free Bayesian calibration of NumPyro models with ensemble Kalman
methods."""

from eki_infer.noise import (
    BlockNoise,
    DenseNoise,
    DiagonalNoise,
    LowRankNoise,
    ScalarNoise,
    block_diagonal,
)

__version__ = "0.1.0"

__all__ = [
    "BlockNoise",
    "DenseNoise",
    "DiagonalNoise",
    "LowRankNoise",
    "ScalarNoise",
    "block_diagonal",
]

"""The four redundancy metrics, differentiable, one implementation each.

Every number `wcond inspect` reports comes from a function in this module, and the
same functions serve as training regularizers::

    loss = task_loss + beta * wcond.metrics.conv_similarity(model)

Definitions follow docs/METRICS.md (the project's contract). Inputs are a weight
tensor of shape (out, in, *kernel), a list of them, or an ``nn.Module`` (whose Conv and
Linear weights are walked). fp16/bf16 are upcast to float32; float64 stays float64.

The modules follow the data: ``buffers`` (temporaries kept across calls), ``vectors`` (a layer's
rows or columns, their norms and unit vectors), ``blocks`` (the Gram panels of the unit vectors),
``near_parallel`` (float32 candidates, decided in float64), ``pairs`` (pair statistics),
``convolutional_similarity`` and ``losses`` (ACV, Norm Loss, RaRe).
"""

from wcond.metrics.buffers import _buffer as _buffer  # read by tests: the kept buffers
from wcond.metrics.buffers import _workspace as _workspace
from wcond.metrics.buffers import reuse_buffers
from wcond.metrics.convolutional_similarity import (
    autocorrelation_sums,
    conv_similarity,
    conv_similarity_batch,
    conv_similarity_floor,
    conv_similarity_floor_of,
    conv_similarity_norm,
    filter_energies,
    pair_norm_products,
    pair_norm_products_of,
)
from wcond.metrics.losses import (
    acv,
    acv_floor,
    norm_dev_max,
    norm_dev_max_of_norms,
    norm_loss,
    norm_loss_of_norms,
    rare,
)
from wcond.metrics.near_parallel import Pair, near_parallel_among, near_parallel_pairs
from wcond.metrics.pairs import PairStats, pair_statistics
from wcond.metrics.vectors import as_cols, as_float, as_rows, vector_norms

__all__ = [
    "Pair",
    "PairStats",
    "acv",
    "acv_floor",
    "as_cols",
    "as_float",
    "as_rows",
    "autocorrelation_sums",
    "conv_similarity",
    "conv_similarity_batch",
    "conv_similarity_floor",
    "conv_similarity_floor_of",
    "conv_similarity_norm",
    "filter_energies",
    "near_parallel_among",
    "near_parallel_pairs",
    "norm_dev_max",
    "norm_loss",
    "pair_norm_products",
    "pair_norm_products_of",
    "norm_dev_max_of_norms",
    "norm_loss_of_norms",
    "pair_statistics",
    "rare",
    "reuse_buffers",
    "vector_norms",
]

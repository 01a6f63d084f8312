"""RaRe merging (the RaRe paper, docs/METRICS.md): fuse near-parallel rows and columns into a smaller checkpoint.

Two ways to shrink:

* :func:`shrink` stores each shrunk layer factorized, ``W ~ P W' Q``, with P and Q sparse: W'
  keeps one row (output unit) or column (input channel) per group of fused ones, and each
  original without a row/column of its own is stored as an [original, stored] pair and a scale,
  12 bytes a fused pair. Any model loads it through :func:`load_state_dict`, which rebuilds
  dense tensors (files of the older format 1, an index and a coefficient for every row and
  column, too). The file format is specified in docs/FACTORIZED.md.
* :func:`fold` removes units outright along an explicit chain of layers joined by ReLU-like
  activations: a unit whose row (bias included) is a positive multiple of another's is dropped
  and its outgoing weights are added to the other's. The result is a plain, narrower state
  dict, exactly equivalent for exactly parallel units.

The modules follow the steps: :mod:`.pairs` finds and fuses near-parallel vectors,
:mod:`.factorized` writes the factorized format (:mod:`.sizing` counts its bytes),
:mod:`.folding` removes units along links, :mod:`.tracing` finds the links of a whole model,
:mod:`.output` writes checkpoints and expands them; reading the format lives with loading, in
:mod:`wcond.checkpoint.factorized`.
"""

from __future__ import annotations

from wcond.checkpoint.factorized import (
    COL_COEF,
    COL_FUSED,
    COL_INDEX,
    COL_SCALE,
    FOLD_MANIFEST_KEY,
    MANIFEST_KEY,
    ROW_COEF,
    ROW_FUSED,
    ROW_INDEX,
    ROW_SCALE,
    W_SUFFIX,
    Factored,
    dense_view,
    fused_to_index,
    load_state_dict,
    rebuild_dense,
    rebuild_fused,
)
from wcond.shrink.factorized import Factorization, factorize, owner_scaled, shrink
from wcond.shrink.folding import Link, fold, fold_links
from wcond.shrink.output import ExpandResult, expand
from wcond.shrink.pairs import Grouping, fuse_vectors
from wcond.shrink.report import FoldReport, LayerShrink, ShrinkReport
from wcond.shrink.tracing import fold_model

__all__ = [
    "COL_COEF",
    "COL_FUSED",
    "COL_INDEX",
    "COL_SCALE",
    "FOLD_MANIFEST_KEY",
    "MANIFEST_KEY",
    "ROW_COEF",
    "ROW_FUSED",
    "ROW_INDEX",
    "ROW_SCALE",
    "W_SUFFIX",
    "ExpandResult",
    "FoldReport",
    "Link",
    "Factorization",
    "Factored",
    "Grouping",
    "LayerShrink",
    "ShrinkReport",
    "dense_view",
    "expand",
    "factorize",
    "fold",
    "fold_links",
    "fold_model",
    "fuse_vectors",
    "fused_to_index",
    "load_state_dict",
    "owner_scaled",
    "rebuild_dense",
    "rebuild_fused",
    "shrink",
]

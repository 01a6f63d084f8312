"""RaRe merging (papers/rank-redundancy.txt): fuse near-parallel rows and columns into a smaller checkpoint.

Two ways to shrink:

* :func:`shrink` stores each shrunk layer factorized, ``W ~ P W' Q``, with P and Q sparse: one
  index and one coefficient per original row (output unit) and per original column (input
  channel). Any model loads it through :func:`load_state_dict`, which rebuilds dense tensors.
  The file format is specified in docs/FACTORIZED.md.
* :func:`fold` removes units outright along an explicit chain of layers joined by ReLU-like
  activations: a unit whose row (bias included) is a positive multiple of another's is dropped
  and its outgoing weights are added to the other's. The result is a plain, narrower state
  dict, exactly equivalent for exactly parallel units.

The modules follow the steps: :mod:`.pairs` finds and fuses near-parallel vectors,
:mod:`.factorized` writes the factorized format (:mod:`.sizing` counts its bytes),
:mod:`.folding` removes units along links, :mod:`.tracing` finds the links of a whole model,
:mod:`.output` writes checkpoints and expands them; reading the format lives with loading, in
:mod:`wcond.load_factorized`.
"""

from __future__ import annotations

from wcond.load_factorized import (
    COL_COEF,
    COL_INDEX,
    FOLD_MANIFEST_KEY,
    MANIFEST_KEY,
    ROW_COEF,
    ROW_INDEX,
    W_SUFFIX,
    Factored,
    dense_view,
    load_state_dict,
    rebuild_dense,
)
from wcond.shrink.factorized import Factorization, factorize, shrink
from wcond.shrink.folding import Link, fold, fold_links
from wcond.shrink.output import ExpandResult, expand
from wcond.shrink.pairs import Grouping, fuse_vectors
from wcond.shrink.report import FoldReport, LayerShrink, ShrinkReport
from wcond.shrink.tracing import fold_model

__all__ = [
    "COL_COEF",
    "COL_INDEX",
    "FOLD_MANIFEST_KEY",
    "MANIFEST_KEY",
    "ROW_COEF",
    "ROW_INDEX",
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
    "load_state_dict",
    "rebuild_dense",
    "shrink",
]

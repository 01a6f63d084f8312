"""The Gram panels: the upper triangle of u u^T in row blocks of bounded size."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from wcond.metrics.buffers import _buffer

# Pairwise cosine blocks are at most this many elements (64 MiB in float32), so a
# 32000 x 4096 embedding never materializes its 32000 x 32000 cosine matrix.
_BLOCK_ELEMENTS = 1 << 24


def _cosine_blocks(u: Tensor) -> Iterator[tuple[int, Tensor]]:
    """The upper triangle of u u^T in row blocks of at most 2**24 cosines: (first row, cosines).

    Block rows start..stop are taken against columns start..n only, so column 0 of a block is row
    ``start``; entries on or below the diagonal are set to 0, which no cosine statistic counts.
    """
    n, d = u.shape
    # Up to 1024 rows a block: wide GEMMs run near the machine's best rate, and every block costs
    # a dozen small operations on its cosines. At most 2**24 cosines bound the memory.
    block = max(1, min(n, _PANEL_ROWS, _BLOCK_ELEMENTS // max(n, 1)))
    track = u.requires_grad and torch.is_grad_enabled()
    for start in range(0, n - 1, block):
        stop = min(n, start + block)
        m = stop - start
        if track:
            c = u[start:stop] @ u[start:].T
            c[:, :m] = c[:, :m].triu(1)  # only this square holds j <= i
        else:
            c = _buffer("cosines", (m, n - start), u.dtype, u.device)
            if stop < n:
                torch.matmul(u[start:stop], u[stop:].T, out=c[:, m:])
            _upper_square(u[start:stop], c[:, :m])
            c[:, :m].triu_(1)  # also clears what _upper_square left below the diagonal
        yield start, c


# Rows per cosine block; _upper_square halves a diagonal square down to no fewer than
# _SQUARE_TILE rows, and only while the square is worth a call of its own.
_PANEL_ROWS = 1024
_SQUARE_TILE = 256
_SQUARE_SPLIT_WORK = 1 << 25  # multiply-adds: splitting a smaller square saves less than it costs


def _upper_square(x: Tensor, out: Tensor) -> None:
    """x x^T into out on and above its diagonal; what lies below is left unwritten (stale).

    A block's leading square holds its diagonal: computed whole, half of it is wasted (a quarter of
    a 1024-row block's work against 2048 vectors). Halving it recursively computes each
    off-diagonal half once and only the small squares on the diagonal whole. Measured on a 1.1B
    model's decoder layer (seven matrices, 2048 to 5632 vectors): 2% less time a layer than
    256-row blocks with whole squares; 5632-vector Grams 4% to 16% less, 2048-vector ones within
    the noise.
    """
    m, d = x.shape
    if m < 2 * _SQUARE_TILE or m * m * d < _SQUARE_SPLIT_WORK:
        torch.matmul(x, x.T, out=out)
        return
    h = m // 2
    _upper_square(x[:h], out[:h, :h])
    torch.matmul(x[:h], x[h:].T, out=out[:h, h:])
    _upper_square(x[h:], out[h:, h:])

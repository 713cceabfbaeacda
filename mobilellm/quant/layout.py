"""The cpu scheme's storage order for int4 weights: 8-row panels, the order its AVX2 kernel reads.

Row layout (math.pack_int4): (N, K/2) bytes, one row after another. Panel layout: the rows are padded with
zeros to a multiple of 8, and within each panel of 8 rows the rows' 4-byte words are interleaved (word 0 of
rows 0..7, then word 1 of rows 0..7, ...); the scales (N, K/G) likewise (group 0 of rows 0..7, ...). Shapes
stay 2-D, (N rounded up to 8, K/2) and (N rounded up to 8, K/G); only the order inside a panel changes. One
32-byte load then holds 8 weights of each of 8 rows, so the kernel computes 8 outputs per pass over one
sequential stream, and a tied embedding reads its rows back with a strided gather (panel_rows).
"""

from __future__ import annotations

import torch

PANEL_ROWS = 8
_WORD = 4  # bytes interleaved per row


def padded_rows(n: int) -> int:
    return -(-n // PANEL_ROWS) * PANEL_ROWS


def _interleave(t: torch.Tensor) -> torch.Tensor:  # (N8, C) -> panel order, same shape
    n, c = t.shape
    return t.view(n // PANEL_ROWS, PANEL_ROWS, c).transpose(1, 2).contiguous().view(n, c)


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    n, c = t.shape
    return t.view(n // PANEL_ROWS, c, PANEL_ROWS).transpose(1, 2).contiguous().view(n, c)


def _words(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % _WORD:
        raise ValueError(f"packed int4 weights must be uint8 (N, K/2) with K a multiple of 8, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    return packed.contiguous().view(torch.int32)


def to_panels(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-layout (N, K/2) uint8 and (N, K/G) scales -> the panel layout (rows padded with zeros)."""
    n = packed.shape[0]
    pad = padded_rows(n) - n
    if scales.shape[0] != n:
        raise ValueError(f"scales have {scales.shape[0]} rows for {n} weight rows")
    words = _words(packed)
    if pad:
        words = torch.cat([words, words.new_zeros(pad, words.shape[1])])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
    return _interleave(words).view(torch.uint8), _interleave(scales.contiguous())


def from_panels(packed: torch.Tensor, scales: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of to_panels: the first `rows` rows in row layout."""
    return _deinterleave(_words(packed)).view(torch.uint8)[:rows], _deinterleave(scales)[:rows]


def panel_rows(packed: torch.Tensor, scales: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` (1-D) of panel-layout tensors, in row layout: what an embedding lookup reads."""
    words = _words(packed)
    panel, lane = index // PANEL_ROWS, index % PANEL_ROWS
    rows = words.view(-1, words.shape[1], PANEL_ROWS)[panel, :, lane]
    row_scales = scales.view(-1, scales.shape[1], PANEL_ROWS)[panel, :, lane]
    return rows.contiguous().view(torch.uint8), row_scales

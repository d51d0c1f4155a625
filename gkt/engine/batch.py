"""The running batch's KV cache: rows join at any step, leave at any step, padding kept on the left.

Every row's real tokens sit contiguously at the right end of the cache, behind masked padding slots,
so a sliding-window layer (which measures distance in cache slots) sees the same neighbours as the
row would alone; position ids are kept per row for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class KvBatch:
    """Keys, values and attention mask of the rows decoding together (row i = batch index i)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, layers: Layers) -> None:
        """Append one row whose cache holds `layers` (each [1, heads, length, dim], all real tokens)."""
        length = int(layers[0][0].shape[2])
        device = layers[0][0].device
        row_mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None or self.mask is None:
            self.cache = DynamicCache(ddp_cache_data=layers)
            self.mask = row_mask
            return
        width = self.width
        if length > width:
            self._pad_left(length - width)
        elif length < width:
            layers = [(_pad(k, width - length), _pad(v, width - length)) for k, v in layers]
            row_mask = torch.cat([row_mask.new_zeros(1, width - length), row_mask], dim=1)
        for layer, (keys, values) in zip(_layers(self.cache), layers, strict=True):
            layer.keys = torch.cat([layer.keys, keys], dim=0)
            layer.values = torch.cat([layer.values, values], dim=0)
        self.mask = torch.cat([self.mask, row_mask], dim=0)

    def extend_mask(self) -> torch.Tensor:
        """The mask for the next step (every row gains one real token), kept as the new mask."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        return self.mask

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); drop padding columns no remaining row needs."""
        if not rows:
            self.cache = self.mask = None
            return
        assert self.cache is not None and self.mask is not None
        if len(rows) < self.size:
            index = torch.tensor(list(rows), device=self.mask.device)
            for layer in _layers(self.cache):
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self.mask = self.mask.index_select(0, index)
        unused = int(self.mask.any(dim=0).int().argmax())
        if unused:
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def _pad_left(self, n: int) -> None:
        assert self.cache is not None and self.mask is not None
        for layer in _layers(self.cache):
            layer.keys = _pad(layer.keys, n)
            layer.values = _pad(layer.values, n)
        self.mask = torch.cat([self.mask.new_zeros(self.size, n), self.mask], dim=1)


def _pad(states: torch.Tensor, n: int) -> torch.Tensor:
    """`n` zero slots in front of every row's states (dim 2 is the sequence)."""
    zeros = states.new_zeros(states.shape[0], states.shape[1], n, states.shape[3])
    return torch.cat([zeros, states], dim=2)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer objects (each with `keys` and `values` of shape [rows, heads, slots, dim])."""
    return list(cache.layers)

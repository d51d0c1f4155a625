"""The running batch's KV cache: rows join at any step, leave at any step, padding kept on the left.

Every row's real tokens sit contiguously at the right end of the cache, behind masked padding slots,
so a sliding-window layer (which measures distance in cache slots) sees the same neighbours as the
row would alone; position ids are kept per row for the same reason.

Each layer keeps its keys and values in a buffer with spare slots: a decode step writes its token in
place. Growing the cache by concatenation instead copies the whole batch's cache at every step, which
on a CPU costs more than the step's own arithmetic once a batch is a few rows wide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]

SPARE_SLOTS = 64
"""Slots added whenever a buffer fills: one copy of the cache per this many steps."""


class SlotLayer(DynamicLayer):
    """A cache layer whose `keys` and `values` are views of buffers with room for more tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._set(keys, values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.length + n > self._keys.shape[2]:
            self._set(
                self._keys[:, :, : self.length], self._values[:, :, : self.length], spare=n + SPARE_SLOTS
            )
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        return self._view(self.length + n)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, *, spare: int = SPARE_SLOTS) -> None:
        """Copy `keys` and `values` into new buffers with `spare` free slots after them."""
        rows, heads, length, dim = keys.shape
        self._keys = keys.new_empty(rows, heads, length + spare, dim)
        self._values = values.new_empty(rows, heads, length + spare, values.shape[3])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._view(length)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the tokens cached so far."""
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def _view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.length = length
        keys, values = self._keys[:, :, :length], self._values[:, :, :length]
        self.keys, self.values = keys, values
        return keys, values


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
        row_mask = torch.ones(1, length, dtype=torch.long, device=layers[0][0].device)
        if self.cache is None or self.mask is None:
            self._install(layers, row_mask)
            return
        width = self.width
        current = self._layers()
        if length > width:
            current = [(_pad(k, length - width), _pad(v, length - width)) for k, v in current]
            self.mask = torch.cat([self.mask.new_zeros(self.size, length - width), self.mask], dim=1)
        elif length < width:
            layers = [(_pad(k, width - length), _pad(v, width - length)) for k, v in layers]
            row_mask = torch.cat([row_mask.new_zeros(1, width - length), row_mask], dim=1)
        joined = [
            (torch.cat([k, new_k], dim=0), torch.cat([v, new_v], dim=0))
            for (k, v), (new_k, new_v) in zip(current, layers, strict=True)
        ]
        self._install(joined, torch.cat([self.mask, row_mask], dim=0))

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
        assert self.mask is not None
        index = torch.tensor(list(rows), device=self.mask.device)
        mask = self.mask.index_select(0, index)
        unused = int(mask.any(dim=0).int().argmax())
        kept = [
            (k.index_select(0, index)[:, :, unused:], v.index_select(0, index)[:, :, unused:])
            for k, v in self._layers()
        ]
        self._install(kept, mask[:, unused:])

    def _layers(self) -> Layers:
        assert self.cache is not None
        layers: list[SlotLayer] = self.cache.layers  # type: ignore[assignment]
        return [layer.view() for layer in layers]

    def _install(self, layers: Layers, mask: torch.Tensor) -> None:
        cache = DynamicCache()
        cache.layers = [SlotLayer(keys, values) for keys, values in layers]
        self.cache, self.mask = cache, mask


def _pad(states: torch.Tensor, n: int) -> torch.Tensor:
    """`n` zero slots in front of every row's states (dim 2 is the sequence)."""
    zeros = states.new_zeros(states.shape[0], states.shape[1], n, states.shape[3])
    return torch.cat([zeros, states], dim=2)

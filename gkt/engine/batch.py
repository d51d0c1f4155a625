"""The running batch's KV cache: rows join at any step, leave at any step, padding kept on the left.

Every row's real tokens sit contiguously at the right end of the batch's window of cache slots,
behind masked padding, so a sliding-window layer (which measures distance in cache slots) sees the
same neighbours as the row would alone; position ids are kept per row for the same reason.

The keys and values live in buffers with spare rows and spare slots. A step writes its token into
the next slot in place; a row that joins is written into the next spare row; a row that leaves is
replaced by the last row; padding no row needs is dropped by moving the window's start. So a step
costs no copy of the cache, and a join or a leave copies one row, not the batch: on a CPU, copying
a wide batch's cache costs more than the step's own arithmetic.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]

SPARE_SLOTS = 128
"""Slots added when the window reaches the end of the buffers (one copy per this many steps)."""


class KvBatch:
    """Keys, values and attention mask of the rows decoding together (row i = batch index i)."""

    def __init__(self) -> None:
        self.size = 0
        self.start = self.end = 0
        """The window of slots in use: [start, end)."""
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self.cache = DynamicCache()

    @property
    def width(self) -> int:
        return self.end - self.start

    def add(self, layers: Layers) -> None:
        """Append one row whose cache holds `layers` (each [1, heads, length, dim], all real tokens)."""
        length = int(layers[0][0].shape[2])
        if not self._keys:
            self._allocate(layers, rows=4, slots=length + SPARE_SLOTS)
        if self.size == 0:  # an empty batch starts a fresh window
            self.start = self.end = min(length, self._slots)
        if self.size == self._rows:
            self._reshape(rows=2 * self._rows, slots=self._slots)
        if length > self.end:
            self._reshape(rows=self._rows, slots=self._slots + length - self.end, shift=length - self.end)
        assert self._mask is not None
        if length > self.width:  # the window widens to the left: those slots are padding for the others
            self._mask[: self.size, self.end - length : self.start] = 0
            self.start = self.end - length
        row = self.size
        for buffer, (states, _) in zip(self._keys, layers, strict=True):
            buffer[row, :, self.end - length : self.end] = states[0]
        for buffer, (_, states) in zip(self._values, layers, strict=True):
            buffer[row, :, self.end - length : self.end] = states[0]
        self._mask[row, self.start : self.end - length] = 0
        self._mask[row, self.end - length : self.end] = 1
        self.size += 1

    def begin_step(self) -> torch.Tensor:
        """Make room for one more slot; return the attention mask of the step (every row gains one real
        token). The model's cache layers write that slot; `end_step` then counts it."""
        if self.end == self._slots:
            self._reshape(rows=self._rows, slots=self.width + SPARE_SLOTS, shift=-self.start)
        assert self._mask is not None
        self._mask[: self.size, self.end] = 1
        return self._mask[: self.size, self.start : self.end + 1]

    def end_step(self) -> None:
        self.end += 1

    def remove(self, row: int) -> None:
        """Drop `row`; the last row takes its place (the caller reorders its rows the same way)."""
        last = self.size - 1
        if row != last:
            window = slice(self.start, self.end)
            for buffer in (*self._keys, *self._values):
                buffer[row, :, window] = buffer[last, :, window]
            assert self._mask is not None
            self._mask[row, window] = self._mask[last, window]
        self.size -= 1
        self._trim()

    def clear(self) -> None:
        self.size = 0

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values of the rows and slots in use."""
        return (
            self._keys[layer][: self.size, :, self.start : self.end],
            self._values[layer][: self.size, :, self.start : self.end],
        )

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's keys and values in the slot after the window; the window with that slot."""
        self._keys[layer][: self.size, :, self.end : self.end + 1] = keys
        self._values[layer][: self.size, :, self.end : self.end + 1] = values
        return (
            self._keys[layer][: self.size, :, self.start : self.end + 1],
            self._values[layer][: self.size, :, self.start : self.end + 1],
        )

    @property
    def _rows(self) -> int:
        return int(self._keys[0].shape[0])

    @property
    def _slots(self) -> int:
        return int(self._keys[0].shape[2])

    def _trim(self) -> None:
        """Move the window's start past the slots that are padding for every remaining row."""
        if self.size == 0 or self._mask is None:
            self.start = self.end
            return
        used = self._mask[: self.size, self.start : self.end].any(dim=0)
        self.start += int(used.int().argmax())

    def _allocate(self, layers: Layers, *, rows: int, slots: int) -> None:
        self._keys = [k.new_zeros(rows, k.shape[1], slots, k.shape[3]) for k, _ in layers]
        self._values = [v.new_zeros(rows, v.shape[1], slots, v.shape[3]) for _, v in layers]
        self._mask = torch.zeros(rows, slots, dtype=torch.long, device=layers[0][0].device)
        self.cache = DynamicCache()
        self.cache.layers = [_BatchLayer(self, i) for i in range(len(layers))]

    def _reshape(self, *, rows: int, slots: int, shift: int = 0) -> None:
        """New buffers of `rows` × `slots`; the window moves by `shift` slots."""
        assert self._mask is not None
        old = slice(self.start, self.end)
        new = slice(self.start + shift, self.end + shift)
        n = self.size

        def moved(buffer: torch.Tensor) -> torch.Tensor:
            fresh = buffer.new_zeros(rows, buffer.shape[1], slots, buffer.shape[3])
            fresh[:n, :, new] = buffer[:n, :, old]
            return fresh

        self._keys = [moved(b) for b in self._keys]
        self._values = [moved(b) for b in self._values]
        mask = self._mask.new_zeros(rows, slots)
        mask[:n, new] = self._mask[:n, old]
        self._mask = mask
        self.start, self.end = self.start + shift, self.end + shift


class _BatchLayer(DynamicLayer):
    """One model layer's view of the batch's buffers, as the model's cache API expects it."""

    def __init__(self, batch: KvBatch, index: int) -> None:
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.batch.width

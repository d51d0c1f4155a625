"""Stop strings: where the first one begins in a text, and how much of a text's end could begin one.

`StopScanner` applies them to text that arrives in pieces (a remote server's stream), holding back
what could still turn out to be the start of a stop string, as `gkt.decoding.TextTracker` does for
tokens decoded in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could begin a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


@dataclass
class StopScanner:
    """Text arriving in pieces, cut at the first stop string; `push` returns what became safe to show."""

    stop: tuple[str, ...]
    strip_leading: bool = False
    """Drop leading whitespace (a student answering with no guidance starts after "A:")."""
    text: str = ""
    stopped: bool = False
    emitted: int = 0
    piece_starts: list[int] = field(default_factory=list)
    """Where each piece began in the text (pieces that added nothing included)."""

    def push(self, piece: str) -> str:
        """Add one piece; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.piece_starts.append(len(self.text))
        text = self.text + piece
        if self.strip_leading:
            text = text.lstrip()
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - held_back(text, self.stop))

    def flush(self) -> str:
        """The text held back so far; safe to show once the stream has ended."""
        return self._take(len(self.text))

    @property
    def kept_pieces(self) -> int:
        """Pieces that contributed to the kept text (all of them unless a stop string cut it)."""
        if not self.stopped:
            return len(self.piece_starts)
        return sum(1 for start in self.piece_starts if start < len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta

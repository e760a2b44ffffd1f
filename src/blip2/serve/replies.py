"""A reply's text as it is generated: printable pieces for a stream, cut at the first stop string.

Pieces are released as ``TextPieces`` releases them (up to the last space: a word may still change), and, when
there are stop strings, never within the last ``len(longest stop) - 1`` characters, which could be the start of
one. The pieces join to the final text: ``decode(tokens).strip()``, or, after a stop string, what precedes it
(right-stripped), as OpenAI's ``stop`` does.
"""

from __future__ import annotations

from blip2.infer.decoding import TextPieces


class ReplyText:
    def __init__(self, tokenizer, stops: list[str] = ()):
        self.pieces = TextPieces(tokenizer)
        self.stops = [stop for stop in stops if stop]
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1
        self.shown = ""
        self.stopped = False  # a stop string was found: the text is final

    def add(self, token: int) -> str:
        """The printable text that ``token`` completes ("" if none yet)."""
        self.pieces.add(token)
        text = self.pieces.text()
        cut = min((i for i in (text.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut].rstrip())
        return self._release(self.pieces.shown[: max(len(text) - self.hold, 0)])

    def finish(self) -> str:
        """The rest of the text, once no token follows."""
        return "" if self.stopped else self._release(self.pieces.text())

    def _release(self, ready: str) -> str:
        if len(ready) <= len(self.shown):
            return ""
        piece, self.shown = ready[len(self.shown) :], ready
        return piece

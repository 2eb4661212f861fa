"""Incremental detokenization of one completion, with stop strings.

The completion's text is ``tokenizer.decode(new ids)`` (what ``pldr-jax generate`` prints: the EOS
and anything after it are not text).  `TextStream.add` returns the text that became final with each
token: a delta is held back while it ends in an incomplete byte-fallback character (U+FFFD) or could
still be the start of a stop string, so the deltas of a stream always join to the non-streamed
text.  A stop string ends the completion; the text stops before it (OpenAI's ``stop``).
"""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    """tokenizer: anything with ``decode(ids) -> str`` (None: no text, no stop strings).
    stop: stop strings."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""          # the final text so far (emitted)
        self.stopped = False    # a stop string was found
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _full(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def add(self, token: int) -> str:
        """Append one token; return the newly final text (possibly "").  After a stop string is
        found, `stopped` is True and the text ends before it."""
        self.ids.append(int(token))
        if self.tokenizer is None:
            return ""
        full = self._full()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        end = len(full) - self._hold
        while end > len(self.text) and full[end - 1] == "\ufffd":
            end -= 1
        return self._emit(full[:end]) if end > len(self.text) and full.startswith(self.text) else ""

    def finish(self) -> str:
        """The rest of the text when the completion ends (not after a stop string: nothing more)."""
        if self.tokenizer is None or self.stopped:
            return ""
        full = self._full()
        return self._emit(full) if full.startswith(self.text) else ""

    def _emit(self, text: str) -> str:
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = self.text + delta
        return delta

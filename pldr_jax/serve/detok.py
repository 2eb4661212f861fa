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
    stop: stop strings.

    Incremental: each token decodes only the ids since the last stable point, with the id(s) before
    them (two short decodes, as vLLM's ``detokenize_incrementally``; back to a visible character,
    since sentencepiece drops the leading spaces of what it decodes), not the whole completion
    again; `finish` decodes the whole completion once and emits what the pieces have not."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""          # the final text so far (emitted)
        self.stopped = False    # a stop string was found
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._decoded = ""      # the stable decoded text (emitted + held back)
        self._prefix = 0        # ids[_prefix:_read] decode to the end of _decoded
        self._read = 0

    def _full(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def _advance(self) -> None:
        decode = self.tokenizer.decode
        c = self._prefix
        before = decode(self.ids[c:self._read]) if self._read > c else ""
        while c > 0 and not before.strip():    # sentencepiece drops a decoded text's leading spaces:
            c -= 1                              # keep a visible character before the new ids
            before = decode(self.ids[c:self._read])
        now = decode(self.ids[c:])
        if len(now) > len(before) and now.startswith(before) and not now.endswith("\ufffd"):
            self._decoded += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _stop_in(self, text: str) -> int:
        """The first stop string's start in text at or after the emitted text (-1: none); a stop
        string ending in new text starts there (the held-back tail is a stop string's length - 1)."""
        start = len(self.text)
        return min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)

    def add(self, token: int) -> str:
        """Append one token; return the newly final text (possibly "").  After a stop string is
        found, `stopped` is True and the text ends before it."""
        self.ids.append(int(token))
        if self.tokenizer is None:
            return ""
        self._advance()
        full = self._decoded
        cut = self._stop_in(full)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        end = len(full) - self._hold
        while end > len(self.text) and full[end - 1] == "\ufffd":
            end -= 1
        return self._emit(full[:end]) if end > len(self.text) else ""

    def finish(self) -> str:
        """The rest of the text when the completion ends (not after a stop string: nothing more)."""
        if self.tokenizer is None or self.stopped:
            return ""
        full = self._full()
        if not full.startswith(self.text):
            return ""
        cut = self._stop_in(full)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full)

    def _emit(self, text: str) -> str:
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = self.text + delta
        return delta

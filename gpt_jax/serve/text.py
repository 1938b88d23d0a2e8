"""Token ids -> text as they are generated: never half a UTF-8 character, never a stop string.

`TextStream.add(token)` returns the text that is safe to show now. Text is held back while the
decoded tail is an incomplete character (it decodes to U+FFFD) or could be the start of a stop
string; a stop string ends the stream, and neither it nor anything after it is returned.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self._prefix = self._read = 0  # tokens[_prefix:_read] decode to text already taken
        self._held = ""  # decoded text not shown yet: it may begin a stop string
        self.text = ""  # what was shown
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one generated token; the new text that may be shown ("" while held, and
        after a stop string)."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        new = self.tokenizer.decode(self.tokens[self._prefix:])
        if new.endswith(REPLACEMENT):  # an incomplete character: wait for its next bytes
            return ""
        old = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        self._prefix, self._read = self._read, len(self.tokens)
        return self._take(new[len(old):])

    def finish(self) -> str:
        """The held text, when the stream ends for another reason than a stop string."""
        if self.stopped:
            return ""
        rest = self.tokenizer.decode(self.tokens[self._prefix:])
        rest = rest[len(self.tokenizer.decode(self.tokens[self._prefix:self._read])):]
        out, self._held = self._held + rest, ""
        self._prefix = self._read = len(self.tokens)
        self.text += out
        return out

    def _take(self, delta: str) -> str:
        buf = self._held + delta
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = buf[:min(hits)], "", True
        else:
            keep = max((n for s in self.stop for n in range(1, min(len(s), len(buf) + 1))
                        if buf.endswith(s[:n])), default=0)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

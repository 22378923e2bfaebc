"""Incremental detokenisation with stop strings: token ids in, safe text deltas out.

A byte-level tokenizer can split one UTF-8 character over several tokens, and a stop string can
arrive over several tokens too. `TextStream` therefore holds back (a) text ending in an
incomplete character (the decoder shows it as U+FFFD) and (b) any tail that could still grow
into a stop string, and emits only text that can never change. Once a stop string appears the
stream ends and the text is cut right before it, so no delta ever contains any part of it.

The text is decoded from a window of recent ids (the idea of transformers' TextIteratorStreamer
and vLLM's detokenizer offsets) so each step costs O(window), not O(length of the output).
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

WINDOW_KEEP_IDS = 8
"""Ids left in the decoding window when it is folded: they may still merge with the next id
(e.g. the bytes of one multi-byte character)."""
WINDOW_FOLD_AT_IDS = 4 * WINDOW_KEEP_IDS
"""Window length at which it is folded (rarely, so the fold's extra decode costs little)."""


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


class TextStream:
    """Feed generated token ids one at a time with `push`; read safe deltas back."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""          # the text decided so far (emitted + held back), stop string excluded
        self.emitted = 0        # chars of self.text already returned as deltas
        self.stopped = False    # a stop string was found; push() ignores further ids
        # Decoding window: ids[_anchor:] is decoded each step and the text of ids[_anchor:_settled_upto]
        # (_anchor_text) is cut off its front; decoding from an earlier anchor keeps the context
        # that decoders need to render a token's leading space.
        self._anchor = 0
        self._settled_upto = 0
        self._anchor_text = ""
        self._settled = ""      # text of ids[:_settled_upto]; never changes

    def push(self, token_id: int) -> str:
        """Add one id; return the newly safe text (often ""), never part of a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        tail = self._decode_tail(len(self.ids))
        if tail.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete UTF-8 character: wait for its remaining bytes
        self.text = self._settled + tail
        self._fold_window()
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what was held back (a partial stop match is plain text now)."""
        if not self.stopped and self.ids:
            self.text = self._settled + self._decode_tail(len(self.ids))
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = len(self.text)
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1 and at < cut:
                cut = at
                self.stopped = True
        if self.stopped:
            self.text = self.text[:cut]
        elif not final:
            cut -= self._partial_stop_len()
        cut = max(cut, self.emitted)
        delta = self.text[self.emitted:cut]
        self.emitted = cut
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _decode_tail(self, end: int) -> str:
        """Text of ids[_settled_upto:end], decoded with the ids since the anchor as context."""
        window = self.tokenizer.decode(self.ids[self._anchor:end], skip_special=True)
        return window[len(self._anchor_text):]

    def _fold_window(self) -> None:
        """Keep the decode window short: once it spans WINDOW_FOLD_AT_IDS ids, settle all but the
        last WINDOW_KEEP_IDS."""
        if len(self.ids) - self._anchor < WINDOW_FOLD_AT_IDS:
            return
        new_upto = len(self.ids) - WINDOW_KEEP_IDS
        part = self._decode_tail(new_upto)
        if part.endswith(REPLACEMENT_CHAR):
            return
        self._settled += part
        self._anchor = self._settled_upto
        self._settled_upto = new_upto
        self._anchor_text = self.tokenizer.decode(self.ids[self._anchor:new_upto], skip_special=True)

"""Text pieces of one completion as its tokens arrive: what a stream sends.

Rules (the same for `HFGenerator.stream` and the server's continuous-batching streams):
- whole characters only (`IncrementalDecoder`), no special tokens;
- nothing past a stop string, and a tail that could still become one is held back;
- with loop detection on, the longest tail that repeats earlier text is held back until the text moves
  on: a loop's repeats are trimmed at the end, never sent.
So the pieces concatenated equal the finished `Generation.text` (stream == generate).
"""

from __future__ import annotations

from typing import Sequence

from adgen.generation.config import DecodingConfig
from adgen.generation.repetition import repeated_suffix_len
from adgen.generation.text import IncrementalDecoder, find_stop, stop_prefix_len


class StreamPieces:
    def __init__(self, tokenizer, config: DecodingConfig, stop_ids: Sequence[int]) -> None:
        self.config = config
        self.stop_ids = set(int(i) for i in stop_ids)
        self.decoder = IncrementalDecoder(tokenizer)
        self.sent = ""  # the text sent so far
        self.ended = False  # an end-of-turn token or a stop string came: nothing more is sent
        self.stop_string_hit = False

    def push(self, ids: Sequence[int]) -> str:
        """Take new token ids; return the text that is safe to send now ("" when none)."""
        if self.ended:
            return ""
        for tok in ids:
            if tok in self.stop_ids:
                self.ended = True
                break
            self.decoder.push([tok])
        text, stops = self.decoder.text, self.config.stop
        if stops:
            i = find_stop(text, stops, max(0, len(self.sent) - max(len(s) for s in stops)))
            if i != -1:
                self.ended = self.stop_string_hit = True
                return self._send(text[:i])
            safe = len(text) - stop_prefix_len(text, stops)
        else:
            safe = len(text)
        if self.config.loop_detection:
            safe = min(safe, len(text) - repeated_suffix_len(text))
        return self._send(text[:safe])

    def finish(self, final_text: str) -> str:
        """The rest of the finished completion's text (its `Generation.text`) after what was sent."""
        if not final_text.startswith(self.sent):  # cannot happen by the rules above; never resend
            return ""
        return self._send(final_text)

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        piece, self.sent = upto[len(self.sent) :], upto
        return piece

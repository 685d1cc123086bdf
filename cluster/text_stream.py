"""Output tokens in, text out: incremental detokenization that cuts at stop strings.

    text = TextStream(tokenizer, stop=["\n\n"])
    for new_token_ids in outputs:
        send(text.push(new_token_ids))     # possibly "" while a stop string or a character is pending
    send(text.finish())

    delta, num_taken = text.push_until_stop(new_token_ids)    # a batch: the tokens up to a stop string

Both APIs (gRPC and HTTP) stream what ``push`` releases, so their texts are equal by construction.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Output tokens in, final text out: incremental detokenization and stop strings.

    Each push decodes only a short window (the tokens since the last released word piece), so a long
    output costs O(n), not O(n^2). Text that might be the start of a stop string, or an incomplete UTF-8
    character, is held back until the next tokens settle it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # a transformers tokenizer
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.is_stopped = False
        self._decoded = ""  # released text, then held-back text
        self._num_released_chars = 0
        self._prefix_offset = 0  # token window whose text is already in _decoded: [prefix, read)
        self._read_offset = 0

    @property
    def text(self) -> str:
        return self._decoded[: self._num_released_chars]

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they release (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        self._decoded += self._decode_new(is_final=False)
        return self._release(is_final=False)

    def push_until_stop(self, new_token_ids: Sequence[int]) -> tuple[str, int]:
        """Append tokens up to the one that completes a stop string; return the text they release and how
        many of them were taken (all, unless a stop string ended the text). A batch of several tokens
        then ends exactly where the same tokens pushed one by one would have ended it."""
        if not self.stop:
            return self.push(new_token_ids), len(new_token_ids)
        released = []
        for num_taken, token_id in enumerate(new_token_ids, start=1):
            released.append(self.push((token_id,)))
            if self.is_stopped:
                return "".join(released), num_taken
        return "".join(released), len(new_token_ids)

    def finish(self) -> str:
        """No more tokens: release everything still held back (unless a stop string cut the text)."""
        self._decoded += self._decode_new(is_final=True)
        return self._release(is_final=True)

    def _decode_new(self, is_final: bool) -> str:
        if self.is_stopped:
            return ""
        decode = self.tokenizer.decode
        window = self.token_ids[self._prefix_offset :]
        prefix = decode(self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(window, skip_special_tokens=True)
        if full.endswith("\ufffd") and not is_final:
            return ""  # a multi-byte character split across tokens: wait for the rest
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _release(self, is_final: bool) -> str:
        start = self._num_released_chars
        # Held-back text never contains a whole stop string, so a match starts at or after `start`.
        matches = [i for i in (self._decoded.find(s, start) for s in self.stop) if i >= 0]
        if matches and not self.is_stopped:
            self.is_stopped = True
            self._decoded = self._decoded[: min(matches)]
            end = len(self._decoded)
        elif is_final or self.is_stopped:
            end = len(self._decoded)
        else:
            end = len(self._decoded) - self._stop_prefix_len(self._decoded[start:])
        self._num_released_chars = end
        return self._decoded[start:end]

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest suffix of ``pending`` that begins some stop string."""
        return max(
            (
                k
                for s in self.stop
                for k in range(min(len(s) - 1, len(pending)), 0, -1)
                if pending.endswith(s[:k])
            ),
            default=0,
        )

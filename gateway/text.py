"""Tokenization and incremental detokenization with the checkpoint's tokenizer.json.

`TokenizerPool` encodes prompt text off the event loop: `Tokenizer.encode` holds the GIL for the
whole call (tokenizers 0.23; a 2 MB prompt stalled every other request for ~2 s), while
`encode_batch` releases it, so worker threads suffice. Short prompts and long ones have separate
threads, so a long prompt never queues a short one. A long text is encoded chunk by chunk and
refused as soon as it certainly has more tokens than the context holds: the work for a prompt is
bounded by the context, not by its size in bytes (that bound is gateway/validation.py's).

`Detokenizer` turns a growing list of output ids into text deltas and applies stop strings,
holding back text that may still become a stop string or an incomplete UTF-8 character; it
decodes each new id once (tokenizers' DecodeStream), not the whole output at every step.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from stagemesh.errors import CheckpointError, OutOfRange, ResourceExhausted
from stagemesh.gguf_file import is_gguf
from stagemesh.gguf_tokenizer import gguf_tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it ships none (then only prompt_ids work).
    A .gguf file's is built from its metadata (stagemesh/gguf_tokenizer.py)."""
    if is_gguf(model_dir):
        return gguf_tokenizer(str(model_dir))
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path}: cannot be loaded as a tokenizers file ({exc})") from exc


SHORT_CHARS = 1 << 14  # prompts up to this many characters go to the short lane, in one piece
CHUNK_CHARS = 1 << 16  # a long prompt is counted in pieces of about this size
CHUNK_SLACK_TOKENS = 2  # a cut may change the tokens at it: a few per cut, counted in the refusal's favour


class TokenizerPool:
    """Encodes text in worker threads. Called from the event loop; the tokenizer is shared (it is
    immutable after loading, and encode_batch is safe from several threads)."""

    def __init__(self, tokenizer: Tokenizer, max_long_waiting: int = 8):
        self.tokenizer = tokenizer
        self._short = ThreadPoolExecutor(1, thread_name_prefix="tokenize-short")
        self._long = ThreadPoolExecutor(1, thread_name_prefix="tokenize-long")
        self._long_waiting = 0
        self.max_long_waiting = max_long_waiting

    async def encode(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; OutOfRange once it certainly has more than max_tokens tokens."""
        loop = asyncio.get_running_loop()
        if len(text) <= SHORT_CHARS:
            return await loop.run_in_executor(self._short, self._encode, text, add_special_tokens)
        if self._long_waiting >= self.max_long_waiting:
            raise ResourceExhausted(f"{self._long_waiting} long prompts are being tokenized already; retry shortly")
        self._long_waiting += 1
        try:
            return await loop.run_in_executor(self._long, self._encode_bounded, text, max_tokens, add_special_tokens)
        finally:
            self._long_waiting -= 1

    def close(self) -> None:
        self._short.shutdown(wait=False, cancel_futures=True)
        self._long.shutdown(wait=False, cancel_futures=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def _encode_bounded(self, text: str, max_tokens: int, add_special_tokens: bool) -> list[int]:
        if len(text) > CHUNK_CHARS:
            counted = 0
            for cuts, piece in enumerate(_pieces(text, CHUNK_CHARS), start=1):
                counted += len(self.tokenizer.encode_batch([piece], add_special_tokens=False)[0].ids)
                if counted > max_tokens + CHUNK_SLACK_TOKENS * cuts:
                    raise OutOfRange(f"the prompt has more than {max_tokens} tokens; the model's context is "
                                     f"{max_tokens} tokens")
        return self._encode(text, add_special_tokens)  # not too long: the exact ids, in one piece


def _pieces(text: str, size: int):
    """Consecutive pieces of about `size` characters, cut before whitespace where there is some
    (a byte-level BPE attaches a space to the word after it, so such a cut changes no token)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        yield text[start:end]
        start = end


class Detokenizer:
    """Per-request text state. Not thread-safe; used from the gateway's event loop.

    Decodes incrementally (tokenizers' DecodeStream: each new id decodes a window of the last few,
    not the whole output again); the text equals decoding every output id at once. A tokenizer
    whose decoding of a longer window rewrites earlier text (DecodeStream refuses it) is decoded
    whole from then on.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # decoded text so far (stop string cut)
        self.emitted = 0  # characters of `text` already sent
        self._stream = DecodeStream(skip_special_tokens=True) if tokenizer is not None else None
        self._ids: list[int] = []  # the output ids last seen
        self._fed = 0  # of them, ids given to the stream
        self._held = False  # the stream gave nothing for the last id (an incomplete character, or a skipped special token)
        self._hit = False

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit)."""
        if self.tokenizer is None:
            return "", False
        self._ids = output_ids
        text = self.text = self._cut(self._decode())
        if self._hit:
            return self.flush(), True
        safe = len(text) - self._holdback
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # incomplete UTF-8 (whole decode)
            safe -= 1
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        if self._held and not self._hit:  # the end: what the stream held back, as a whole decode shows it
            self.text = self._cut(self.tokenizer.decode(self._ids, skip_special_tokens=True))
            self._held = False
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

    def _cut(self, text: str) -> str:
        """text up to the first stop string past what was sent (sets _hit when one is there)."""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                text, self._hit = text[:at], True
        return text

    def _decode(self) -> str:
        """The text of every output id so far (without what the stream still holds back)."""
        if self._stream is None:
            return self.tokenizer.decode(self._ids, skip_special_tokens=True)
        text = self.text
        try:
            for i in self._ids[self._fed :]:
                chunk = self._stream.step(self.tokenizer, i)
                self._held = chunk is None
                if chunk:
                    text += chunk
        except Exception:  # noqa: BLE001 - DecodeStream's refusal (a rewritten prefix): decode whole
            self._stream, self._held = None, False
            return self.tokenizer.decode(self._ids, skip_special_tokens=True)
        self._fed = len(self._ids)
        return text

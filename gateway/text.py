"""Tokenization and incremental detokenization with the checkpoint's tokenizer.json.

`Detokenizer` turns a growing list of output ids into text deltas and applies stop strings,
holding back text that may still become a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from stagemesh.errors import CheckpointError


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it ships none (then only prompt_ids work)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path}: cannot be loaded as a tokenizers file ({exc})") from exc


class Detokenizer:
    """Per-request text state. Not thread-safe; used from the gateway's event loop."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # full decoded text so far (stop string cut)
        self.emitted = 0  # characters of `text` already sent

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit)."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        hit = False
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                text, hit = text[:at], True
        self.text = text
        if hit:
            return self.flush(), True
        safe = len(text) - self._holdback
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # incomplete UTF-8 so far
            safe -= 1
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

"""The tokenizer a GGUF file describes, built as a `tokenizers.Tokenizer` (what tokenizer.json
would hold), the same one transformers builds for `AutoTokenizer.from_pretrained(dir,
gguf_file=...)` (transformers 5, integrations/gguf/gguf_tokenizer_mapping.py): GGUF keeps the
vocabulary, merges, token types and special ids as metadata, under `tokenizer.ggml.*`.

Two kinds, by `tokenizer.ggml.model`:
- "gpt2": byte-level BPE (Llama 3, Qwen2, SmolLM2), split by the regex of `tokenizer.ggml.pre`
  where that names one transformers knows, else GPT-2's;
- "llama": sentencepiece BPE with byte fallback (Llama 2, Mistral), merges from the file or, as
  transformers does, recovered from the scores.
Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, so that `<|im_start|>` stays whole. BOS/EOS are added when `add_bos_token` /
`add_eos_token` say so (a sentencepiece vocabulary adds BOS unless told otherwise).
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from stagemesh.errors import CheckpointError
from stagemesh.gguf_file import field, open_gguf

CONTROL, USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table, the
# entries for the architectures served here); any other keeps GPT-2's ByteLevel regex.
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
          "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


@functools.lru_cache(maxsize=2)
def gguf_tokenizer(path: str) -> Tokenizer | None:
    """The file's tokenizer, or None when it has no vocabulary (then only prompt ids work)."""
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in reader.fields:
        return None
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or []
    merges = field(reader, "tokenizer.ggml.merges")
    if kind == "gpt2":
        tok = _byte_level(tokens, merges, field(reader, "tokenizer.ggml.pre"))
        add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        tok = _sentencepiece(tokens, merges, field(reader, "tokenizer.ggml.scores"))
        add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", True))
    else:
        raise CheckpointError(f"{path}: GGUF tokenizer {kind!r} is not supported (supported: gpt2, llama); "
                              "send prompt ids, or serve the model's Hugging Face checkpoint directory")
    _add_special(tok, tokens, types, byte_level=kind == "gpt2")
    _post_processor(tok, tokens, add_bos, bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
                    field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"))
    return tok


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(tokens: list[str], merges: list[str] | None, pre: str | None) -> Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):  # a token not spelled in the byte alphabet is respelled into it
        vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    pairs = [tuple(m.split(" ")) for m in merges or []]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    split = SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:  # transformers' generate_merges(vocab, scores): every split of a token, best score first
        found = []
        for token, score in zip(tokens, scores or [0.0] * len(tokens)):
            local = [(token[:i], token[i:], score) for i in range(1, len(token))
                     if token[:i] in vocab and token[i:] in vocab]
            found += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
        pairs = [(a, b) for a, b, _ in found]
    unk = "<unk>" if "<unk>" in vocab else None
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok


def _add_special(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens as special added tokens (a byte-level one spelled outside the byte alphabet
    is a llama.cpp mislabel, skipped as transformers does), user-defined ones as plain added."""
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def _post_processor(tok: Tokenizer, tokens: list[str], add_bos: bool, add_eos: bool,
                    bos_id: int | None, eos_id: int | None) -> None:
    single, special = ["$A:0"], []
    if add_bos and bos_id is not None:
        single.insert(0, f"{tokens[bos_id]}:0")
        special.append((tokens[bos_id], bos_id))
    if add_eos and eos_id is not None:
        single.append(f"{tokens[eos_id]}:0")
        special.append((tokens[eos_id], eos_id))
    pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                       special_tokens=list(dict.fromkeys(special)))


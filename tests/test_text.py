"""The gateway's incremental detokenizer against decoding every output id at once.

Two real tokenizer kinds: the demo model's byte-level BPE (Llama 3 / SmolLM2 style) and a
sentencepiece BPE with byte fallback and a stripped leading space (Llama 2 / Mistral style, as
stagemesh builds it from a GGUF file), whose multi-byte characters arrive in pieces.
"""

from __future__ import annotations

import random

import pytest

from gateway.text import Detokenizer
from stagemesh.cli.demo_model import train_tokenizer
from stagemesh.gguf_tokenizer import _sentencepiece


def _spm():
    pieces = ["▁the", "▁a", "▁ca", "t", "é", "▁naïve", "▁日本", "語", "▁", "s", "▁stop", "op", "er"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    tok = _sentencepiece(tokens, None, None)
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


TOKENIZERS = {"byte_level_bpe": train_tokenizer, "sentencepiece_byte_fallback": _spm}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _stream(tok, ids, stop=()):
    """Feed ids one step at a time (sometimes two: a step may bring several); the deltas, whether
    a stop string was hit, and the text that reached the client."""
    d, out, deltas, i = Detokenizer(tok, list(stop)), [], [], 0
    rng = random.Random(len(ids))
    while i < len(ids):
        i += rng.choice((1, 1, 1, 2))
        delta, hit = d.update(ids[:i])
        deltas.append(delta)
        if hit:
            return deltas, True, "".join(deltas)
    deltas.append(d.flush())
    return deltas, False, "".join(deltas)


WORDS = ["the", "cat", "a", "naïve", "café", "日本語", "stop", "über", "€5", "🙂", "\n", "s", "caterer", "Zürich"]


def _text_ids(tok, seed: int, n: int) -> list[int]:
    """The ids of a random text of n words (multi-byte characters the vocabulary lacks come as
    byte tokens), with a special token now and then, as a model's output would be."""
    rng = random.Random(seed)
    ids = []
    for i in range(n):
        ids += tok.encode((" " if i else "") + rng.choice(WORDS), add_special_tokens=False).ids
        if rng.random() < 0.1:
            ids.append(tok.token_to_id("</s>"))  # skipped in the text
    return ids


def _random_ids(tok, seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(tok.get_vocab_size()) for _ in range(n)]


def _assert_whole(tokenizer, ids, seed) -> None:
    """The streamed text is the whole decode, and no delta but the last ends inside a character."""
    deltas, hit, text = _stream(tokenizer, ids)
    assert not hit
    assert text == tokenizer.decode(ids, skip_special_tokens=True), seed
    assert all(not d.endswith("\ufffd") for d in deltas[:-1] if d), seed


def test_text_equals_whole_decode(tokenizer):
    """Texts cut into ids."""
    for seed in range(120):
        _assert_whole(tokenizer, _text_ids(tokenizer, seed, random.Random(seed).randrange(1, 40)), seed)


def test_random_ids_byte_level():
    """Any ids at all (lone and broken UTF-8 bytes too) through the byte-level decoder, which maps
    each byte on its own: still the whole decode. (A byte-fallback decoder turns a whole run of
    byte tokens into U+FFFD once the run turns out invalid, so later ids change earlier text there:
    no stream can match that, and the old whole-decode-per-step did not either.)"""
    tokenizer = train_tokenizer()
    for seed in range(120):
        _assert_whole(tokenizer, _random_ids(tokenizer, seed, random.Random(seed).randrange(1, 80)), seed)


def test_stop_string_cuts_at_first_occurrence(tokenizer):
    """A stop string taken from the middle of the text: the client gets exactly the text before its
    first occurrence, whatever the step it completes in."""
    for seed in range(100):
        ids = _text_ids(tokenizer, 1000 + seed, 30)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        at = random.Random(seed).randrange(4, len(whole) - 4)
        stop = whole[at : at + 3]
        deltas, hit, text = _stream(tokenizer, ids, [stop, "never-in-text"])
        assert hit and text == whole[: whole.find(stop)], seed


def test_long_output_decodes_each_id_once(tokenizer):
    """Thousands of ids one at a time: equal to the whole decode (the point of the stream is its cost: a
    step decodes a window, not the output so far)."""
    ids = _text_ids(tokenizer, 7, 2500)
    d, text = Detokenizer(tokenizer, []), ""
    for i in range(1, len(ids) + 1):
        text += d.update(ids[:i])[0]
    text += d.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_tokenizer_gives_no_text():
    d = Detokenizer(None, ["x"])
    assert d.update([5, 6]) == ("", False) and d.flush() == ""


def test_rewritten_prefix_falls_back_to_whole_decode():
    """A byte run that turns invalid after its first byte was sent ('A', then bytes that make the
    run one bad character): the byte-fallback decoder rewrites 'A' as U+FFFD, which DecodeStream
    refuses; the detokenizer then decodes whole, the sent 'A' stays and the rest follows the
    whole decode."""
    tok = _spm()
    byte = [tok.token_to_id(f"<0x{b:02X}>") for b in (0x41, 0xE6, 0x41)]
    ids = [*byte, tok.token_to_id("▁the"), tok.token_to_id("▁a")]
    deltas, hit, text = _stream(tok, ids)
    whole = tok.decode(ids, skip_special_tokens=True)
    assert whole.startswith("\ufffd") and deltas[0] == "A"
    assert text == "A" + whole[1:]


def test_stop_string_in_held_back_text_is_cut_at_the_end():
    """The last id brings a stop string and the first byte of a character in one token (byte-level
    BPE merges both): the stream holds its text back, and the end's whole decode is still cut."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["ab"], vocab["abæ"] = len(vocab), len(vocab) + 1  # "æ" spells the byte 0xE6 (a lead byte)
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("ab", "æ")]))
    tok.decoder = decoders.ByteLevel()
    ids = [vocab["h"], vocab["i"], vocab["abæ"]]
    assert tok.decode(ids) == "hiab\ufffd"
    deltas, hit, text = _stream(tok, ids, ["ab"])
    assert text == "hi"

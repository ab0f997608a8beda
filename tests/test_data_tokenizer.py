"""Tokenizers: the offline byte encoding is a real tiktoken.Encoding; named encodings fail clearly offline."""
import time

import numpy as np
import pytest
import tiktoken

from common import padded_vocab_size
from data.tokenizer import END_OF_TEXT, TokenizerUnavailableError, encode_document, get_encoding, token_dtype


def random_unicode(rng: np.random.Generator, length: int) -> str:
    # Any code point except the surrogates, which UTF-8 cannot encode.
    points = rng.integers(0, 0x110000 - 0x800, size=length)
    return "".join(chr(p + 0x800 if p >= 0xD800 else p) for p in points)


def test_byte_encoding_is_a_tiktoken_encoding_with_257_tokens():
    enc = get_encoding("byte")
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode_single_token(END_OF_TEXT) == 256
    assert padded_vocab_size(enc.n_vocab) == 320
    assert token_dtype(enc) == np.uint16


def test_byte_encoding_round_trips_arbitrary_unicode_as_its_utf8_bytes():
    enc = get_encoding("byte")
    rng = np.random.default_rng(0)
    samples = ["", "hello", " \t\n\r  x  ", "naïve café 日本語 🙂\x00\x7f", "a" * 5000]
    samples += [random_unicode(rng, int(n)) for n in rng.integers(1, 200, size=100)]
    # Mix in ASCII and whitespace runs, which the split pattern treats differently from letters.
    samples += [s + "  \n\t " + s.upper() for s in samples[5:30]]
    for text in samples:
        tokens = enc.encode(text)
        assert tokens == list(text.encode("utf-8"))
        assert enc.decode(tokens) == text


def test_byte_encoding_special_token_only_when_allowed():
    enc = get_encoding("byte")
    text = "a<|endoftext|>b"
    assert enc.encode(text, allowed_special={END_OF_TEXT}) == [97, 256, 98]
    assert enc.decode([97, 256, 98]) == text
    assert enc.encode_ordinary(text) == list(text.encode())
    with pytest.raises(ValueError):  # tiktoken's default: special text is disallowed
        enc.encode(text)


def test_encode_document_appends_exactly_one_end_of_text():
    enc = get_encoding("byte")
    text = "x = '<|endoftext|>'  # a literal, not a boundary\n"
    tokens = encode_document(enc, text)
    assert tokens.tolist() == list(text.encode()) + [256]
    assert (tokens == enc.eot_token).sum() == 1


def encoding_with_n_vocab(n_vocab: int) -> tiktoken.Encoding:
    # A real Encoding whose <|endoftext|> id sets n_vocab, standing in for BPEs we cannot download here.
    return tiktoken.Encoding(name=f"vocab{n_vocab}", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={END_OF_TEXT: n_vocab - 1})


def test_token_dtype_widens_past_65536_tokens():
    assert token_dtype(encoding_with_n_vocab(65_536)) == np.uint16
    assert token_dtype(encoding_with_n_vocab(65_537)) == np.uint32


def test_padded_vocab_is_the_next_multiple_of_64():
    assert padded_vocab_size(encoding_with_n_vocab(50_257).n_vocab) == 50_304  # nanoGPT's GPT-2 vocab_size
    assert padded_vocab_size(encoding_with_n_vocab(70_001).n_vocab) == 70_016
    assert padded_vocab_size(encoding_with_n_vocab(320).n_vocab) == 320


def test_unknown_encoding_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gtp2'.*'byte'.*gpt2"):
        get_encoding("gtp2")


def test_named_encoding_without_cache_or_network_fails_fast_and_explains(tmp_path, monkeypatch):
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    started = time.monotonic()
    try:
        enc = get_encoding("gpt2")
    except TokenizerUnavailableError as error:
        message = str(error)
    else:
        assert enc.n_vocab == 50257
        pytest.skip("the network is reachable: gpt2 was downloaded, so the offline path did not run")
    assert time.monotonic() - started < 30
    assert "'gpt2'" in message and str(cache) in message
    assert "TIKTOKEN_CACHE_DIR=/shared/path python -c" in message and "get_encoding('gpt2')" in message

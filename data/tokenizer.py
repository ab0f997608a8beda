"""Tokenizers, all as `tiktoken.Encoding`s: an offline byte-level one and tiktoken's named BPEs."""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import tiktoken

BYTE_ENCODING = "byte"
END_OF_TEXT = "<|endoftext|>"


class TokenizerUnavailableError(RuntimeError):
    """A named tiktoken encoding whose BPE files are neither cached nor downloadable."""


@functools.lru_cache(maxsize=None)
def byte_encoding() -> tiktoken.Encoding:
    """Every byte is a token (ids 0..255) and <|endoftext|> is 256: no merges, so nothing to download.

    Any split pattern is correct because each piece falls apart into single bytes anyway; the pattern
    only has to cover all text (tiktoken drops what it does not match), which \\S+|\\s+ does.
    """
    return tiktoken.Encoding(
        name=BYTE_ENCODING,
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={END_OF_TEXT: 256},
    )


def get_encoding(name: str) -> tiktoken.Encoding:
    """'byte' is built here; any other name is tiktoken's (e.g. 'gpt2'), read from TIKTOKEN_CACHE_DIR.

    tiktoken itself reads TIKTOKEN_CACHE_DIR at call time (default: <tmp>/data-gym-cache) and downloads
    the BPE files there when they are missing. Without network that download fails; the error says how
    to pre-populate the cache.
    """
    if name == BYTE_ENCODING:
        return byte_encoding()
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: use {BYTE_ENCODING!r} or one of tiktoken's "
                         f"encodings {sorted(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except OSError as error:  # requests' ConnectionError/HTTPError are OSErrors
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR",
                                   os.path.join(tempfile.gettempdir(), "data-gym-cache"))
        raise TokenizerUnavailableError(
            f"cannot load tiktoken encoding {name!r}: its BPE files are not in the tiktoken cache "
            f"({cache_dir}) and downloading them failed ({type(error).__name__}: {error}). "
            f"To work offline, on a machine with internet run\n"
            f"  TIKTOKEN_CACHE_DIR=/shared/path python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"\n"
            f"then copy that folder here (or put it on a shared file system) and set "
            f"TIKTOKEN_CACHE_DIR to it. The '{BYTE_ENCODING}' tokenizer needs no files."
        ) from error


def token_dtype(encoding: tiktoken.Encoding) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if encoding.n_vocab <= 2**16 else np.uint32)


def encode_document(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    """A document's tokens followed by <|endoftext|>, as nanoGPT's prepare.py does.

    Special-token strings inside the text are encoded as ordinary text (like `encode_ordinary`), so a
    document can never inject a document boundary.
    """
    tokens = encoding.encode_to_numpy(text, disallowed_special=())
    return np.append(tokens, np.uint32(encoding.eot_token))

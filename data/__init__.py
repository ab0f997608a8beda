"""Corpora, tiktoken encodings, on-disk token caches and per-rank deterministic batches (no model code)."""
from common import padded_vocab_size
from data.batches import train_batch, validation_batches
from data.cache import TokenCache, build_token_cache
from data.config import DataConfig
from data.corpus import CorpusError, CorpusStats, embedded_corpus_stats, load_documents
from data.tokenizer import TokenizerUnavailableError, get_encoding

__all__ = [
    "DataConfig", "CorpusError", "CorpusStats", "TokenCache", "TokenizerUnavailableError",
    "build_token_cache", "embedded_corpus_stats", "get_encoding", "load_documents",
    "padded_vocab_size", "train_batch", "validation_batches",
]

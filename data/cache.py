"""Tokenize a corpus once per machine into train/val token files that every run and trial memory-maps.

Layout: <cache_dir>/tokens/<source>-<tokenizer>-<key>/{train.bin, val.bin, meta.json, .lock}, where
<key> hashes the source identity (see corpus.source_identity), the tokenizer and the split rule.

Crash safety: the token files are written to temporary files in the same folder, fsynced and renamed
into place; meta.json is written the same way and LAST. A folder is complete only when meta.json exists
and the token files have the sizes it records, so a killed build is never mistaken for a finished one.
Concurrency: builders take an exclusive flock on .lock; the first builds, the others wait and then
reuse its result. The kernel drops the lock when its holder dies, so a killed builder blocks nobody.

Train/val split, by documents: a document goes to val when a hash of its text falls in the lowest
val_fraction of the hash range. This is deterministic, spreads val over the whole corpus (the embedded
corpus' last files alphabetically would be only xml*/zipfile/zoneinfo) and keeps duplicated documents
on one side. When that leaves a split empty (a corpus of a single or very few documents), the token
stream is split instead: its last val_fraction of tokens become val, as nanoGPT does for Shakespeare.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
from tqdm import tqdm

from common import padded_vocab_size
from data.config import DataConfig
from data.corpus import CorpusError, describe_source, expected_document_count, load_documents, source_identity
from data.tokenizer import encode_document, get_encoding, token_dtype

CACHE_FORMAT = 1
META_FILE = "meta.json"
# Documents are sent to tokenization workers in batches of about this many characters.
BATCH_CHARS = 1 << 20
BATCH_MAX_DOCUMENTS = 1024


@dataclass(frozen=True)
class TokenCache:
    folder: Path
    train: np.memmap
    val: np.memmap
    meta: dict

    @property
    def vocab_size(self) -> int:
        """The tokenizer's n_vocab (unpadded); the model uses meta['padded_vocab_size']."""
        return self.meta["vocab_size"]


def cache_folder(cfg: DataConfig) -> Path:
    key = {"format": CACHE_FORMAT, "source": source_identity(cfg), "tokenizer": cfg.tokenizer,
           "split": {"rule": "document-hash", "val_fraction": cfg.val_fraction}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / "tokens" / f"{cfg.source}-{cfg.tokenizer}-{digest}"


def open_token_cache(folder: Path) -> TokenCache | None:
    """The cache in `folder` if it is complete, else None."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT:
        return None
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
            return None
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
    return TokenCache(folder=folder, train=splits["train"], val=splits["val"], meta=meta)


def build_token_cache(cfg: DataConfig) -> TokenCache:
    """Return the token cache for cfg, tokenizing the corpus first if no complete cache exists."""
    folder = cache_folder(cfg)
    cache = open_token_cache(folder)
    if cache is not None:
        return cache
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder / ".lock"):
        cache = open_token_cache(folder)  # another process may have built it while we waited
        if cache is None:
            _build(cfg, folder)
            cache = open_token_cache(folder)
    assert cache is not None, f"token cache in {folder} is incomplete right after building it"
    return cache


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish the token cache in {path.parent}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the handle releases the lock


def _build(cfg: DataConfig, folder: Path) -> None:
    started = time.time()
    # We hold the lock, so leftovers are from a builder that died: an invalid meta.json must go first,
    # before any token file is replaced, and stray temporary files are garbage.
    (folder / META_FILE).unlink(missing_ok=True)
    for stale in folder.glob("*.tmp"):
        stale.unlink()

    encoding = get_encoding(cfg.tokenizer)
    dtype = token_dtype(encoding)
    counts = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    with _temporary(folder, "train") as train_file, _temporary(folder, "val") as val_file:
        files = {"train": train_file, "val": val_file}
        progress = tqdm(total=expected_document_count(cfg), unit="doc", mininterval=1.0,
                        desc=f"tokenizing the {cfg.source} corpus ({cfg.tokenizer})")
        with progress:
            for result in _tokenized_batches(_document_batches(load_documents(cfg)), cfg.tokenizer,
                                             cfg.val_fraction, cfg.num_proc):
                for split in ("train", "val"):
                    tokens, n_documents = result[split]
                    files[split].write(tokens.tobytes())
                    counts[split] += len(tokens)
                    documents[split] += n_documents
                progress.update(documents["train"] + documents["val"] - progress.n)
                progress.set_postfix(tokens=counts["train"] + counts["val"], refresh=False)
        if documents["train"] + documents["val"] == 0:
            raise CorpusError(f"the corpus {describe_source(cfg)} has no documents")
        split_rule = "document-hash"
        if counts["train"] == 0 or counts["val"] == 0:
            split_rule = "token-tail"
            counts = _split_token_tail(files, counts, dtype, cfg.val_fraction, describe_source(cfg))
        for split, handle in files.items():
            _fsync_and_rename(handle, folder / f"{split}.bin")

    meta = {
        "format": CACHE_FORMAT,
        "source": describe_source(cfg),
        "source_identity": source_identity(cfg),
        "tokenizer": cfg.tokenizer,
        "vocab_size": encoding.n_vocab,
        "padded_vocab_size": padded_vocab_size(encoding.n_vocab),
        "eot_token": encoding.eot_token,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": documents["train"] + documents["val"],
        "val_documents": documents["val"] if split_rule == "document-hash" else None,
        "split_rule": split_rule,
        "val_fraction": cfg.val_fraction,
        "build_id": uuid.uuid4().hex,
        "build_seconds": round(time.time() - started, 3),
    }
    with _temporary(folder, "meta") as meta_file:
        meta_file.write(json.dumps(meta, indent=2).encode())
        _fsync_and_rename(meta_file, folder / META_FILE)
    _fsync_directory(folder)


@contextlib.contextmanager
def _temporary(folder: Path, stem: str):
    """A temporary file in `folder` (same file system, so the final rename is atomic); removed on failure."""
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f"{stem}.", suffix=".tmp", delete=False)
    try:
        yield handle
    finally:
        handle.close()
        Path(handle.name).unlink(missing_ok=True)  # already renamed away on success


def _fsync_and_rename(handle, target: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    os.replace(handle.name, target)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _split_token_tail(files: dict, counts: dict, dtype: np.dtype, val_fraction: float,
                      source: str) -> dict:
    """Re-split the tokens, all in one split's file, as train = head and val = the last val_fraction."""
    if counts["train"] == 0:  # let the full file become train, so only the tail has to be copied
        files["train"], files["val"] = files["val"], files["train"]
    total = counts["train"] + counts["val"]
    if total < 2:
        raise CorpusError(f"the corpus {source} has {total} token(s); a train and a validation split "
                          f"need at least 2")
    n_val = min(total - 1, max(1, round(total * val_fraction)))
    files["train"].flush()
    stream = np.memmap(files["train"].name, dtype=dtype, mode="r")
    files["val"].write(stream[total - n_val:].tobytes())
    del stream
    files["train"].truncate((total - n_val) * dtype.itemsize)
    return {"train": total - n_val, "val": n_val}


def _document_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_MAX_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def is_validation_document(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def tokenize_batch(encoding: tiktoken.Encoding, batch: list[str], val_fraction: float) -> dict:
    """{split: (tokens of that split's documents concatenated, in order; number of documents)}."""
    parts = {"train": [], "val": []}
    for text in batch:
        parts["val" if is_validation_document(text, val_fraction) else "train"].append(
            encode_document(encoding, text))
    dtype = token_dtype(encoding)
    return {split: (np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype), len(arrays))
            for split, arrays in parts.items()}


def _tokenized_batches(batches: Iterable[list[str]], tokenizer: str, val_fraction: float,
                       num_proc: int) -> Iterator[dict]:
    """tokenize_batch over the batches, in order; with num_proc > 1 in that many threads.

    Threads, not processes: tiktoken's Rust core and hashlib release the GIL while they work (this is
    how tiktoken's own encode_batch parallelizes), so threads scale with cores here without starting
    interpreters, pickling documents, or the hazards of fork/spawn inside Ray and DeepSpeed workers.
    """
    encoding = get_encoding(tokenizer)
    if num_proc == 1:
        for batch in batches:
            yield tokenize_batch(encoding, batch, val_fraction)
        return
    with ThreadPoolExecutor(num_proc, thread_name_prefix="tokenize") as pool:
        # A bounded window of batches in flight keeps results ordered and memory flat even for a
        # streamed corpus far larger than RAM (pool.map would read the whole input ahead).
        pending = deque()
        for batch in batches:
            pending.append(pool.submit(tokenize_batch, encoding, batch, val_fraction))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

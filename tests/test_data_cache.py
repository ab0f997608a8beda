"""Token caches: tokenized once, reused, crash-safe, one builder at a time, parallel == serial."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data.cache
from data import DataConfig, build_token_cache, get_encoding, train_batch
from data.cache import cache_folder, is_validation_document, open_token_cache

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(folder: Path, n: int = 60) -> list[str]:
    rng = np.random.default_rng(1)
    documents = []
    for i in range(n):
        words = rng.choice(["def", "x", "=", "return", "naïve", "🙂", "\n", "  "], size=int(rng.integers(5, 80)))
        documents.append(f"document {i}\n" + " ".join(words))
        (folder / f"doc{i:03d}.txt").write_text(documents[-1])
    return documents


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    documents = make_corpus(folder)
    cfg = DataConfig(source="files", path=str(folder), cache_dir=str(tmp_path / "cache"), num_proc=1)
    return cfg, documents


def split_documents(tokens: np.ndarray) -> list[str]:
    enc = get_encoding("byte")
    assert tokens[-1] == enc.eot_token
    return enc.decode(tokens.tolist()).split("<|endoftext|>")[:-1]


def test_cache_holds_every_document_once_split_by_hash(corpus):
    cfg, documents = corpus
    cache = build_token_cache(cfg)
    assert cache.train.dtype == np.uint16 and cache.vocab_size == 257
    assert cache.meta["padded_vocab_size"] == 320 and cache.meta["split_rule"] == "document-hash"
    expected_val = [d for d in documents if is_validation_document(d, cfg.val_fraction)]
    assert 0 < len(expected_val) < len(documents)
    assert split_documents(cache.val) == expected_val
    assert split_documents(cache.train) == [d for d in documents if d not in expected_val]
    assert cache.meta["train_tokens"] + cache.meta["val_tokens"] == sum(len(d.encode()) + 1 for d in documents)


def test_second_build_reuses_the_cache_without_tokenizing(corpus):
    cfg, _ = corpus
    first = build_token_cache(cfg)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.folder.iterdir()}
    second = build_token_cache(cfg)
    assert second.meta["build_id"] == first.meta["build_id"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in second.folder.iterdir()} == stamps


def test_changed_source_tokenizer_or_split_gets_its_own_cache(corpus):
    cfg, _ = corpus
    folder = cache_folder(cfg)
    assert cache_folder(cfg.model_copy(update={"val_fraction": 0.1})) != folder
    assert cache_folder(cfg.model_copy(update={"tokenizer": "gpt2"})) != folder
    assert cache_folder(cfg.model_copy(update={"num_proc": 2})) == folder  # parallelism changes nothing
    with open(Path(cfg.path) / "doc000.txt", "a") as f:
        f.write(" appended")
    assert cache_folder(cfg) != folder


def test_partial_build_without_metadata_is_rebuilt(corpus):
    cfg, documents = corpus
    folder = cache_folder(cfg)
    folder.mkdir(parents=True)
    # What a build killed after renaming its token files, before writing meta.json, leaves behind.
    np.arange(10, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(3, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.abc.tmp").write_text("{")
    assert open_token_cache(folder) is None
    cache = build_token_cache(cfg)
    assert sorted(split_documents(cache.train) + split_documents(cache.val)) == sorted(documents)
    assert not list(folder.glob("*.tmp"))


def test_token_file_that_disagrees_with_metadata_is_rebuilt(corpus):
    cfg, _ = corpus
    first = build_token_cache(cfg)
    train, build_id, folder = np.array(first.train), first.meta["build_id"], first.folder
    del first  # unmap before truncating in place: a mapping past the end of its file faults
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(100)
    assert open_token_cache(folder) is None
    second = build_token_cache(cfg)
    assert second.meta["build_id"] != build_id
    assert np.array_equal(second.train, train)


def test_parallel_tokenization_equals_serial(corpus, monkeypatch):
    cfg, _ = corpus
    monkeypatch.setattr(data.cache, "BATCH_MAX_DOCUMENTS", 3)  # many batches, so ordering matters
    serial = build_token_cache(cfg)
    parallel = build_token_cache(cfg.model_copy(update={"num_proc": 3, "cache_dir": cfg.cache_dir + "-p"}))
    assert parallel.folder != serial.folder
    assert np.array_equal(serial.train, parallel.train) and np.array_equal(serial.val, parallel.val)
    for key in ("train_tokens", "val_tokens", "documents", "val_documents"):
        assert serial.meta[key] == parallel.meta[key]


def test_single_document_corpus_splits_its_token_stream(tmp_path):
    text = "".join(f"line {i}\n" for i in range(300))
    (tmp_path / "book.txt").write_text(text)
    cache = build_token_cache(DataConfig(source="files", path=str(tmp_path / "book.txt"),
                                         cache_dir=str(tmp_path / "cache")))
    tokens = list(text.encode()) + [256]
    n_val = round(len(tokens) * 0.05)
    assert cache.meta["split_rule"] == "token-tail"
    assert cache.train.tolist() == tokens[:-n_val] and cache.val.tolist() == tokens[-n_val:]


def test_corpus_shorter_than_a_block_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello")
    cache = build_token_cache(DataConfig(source="files", path=str(tmp_path / "tiny.txt"),
                                         cache_dir=str(tmp_path / "cache")))
    assert len(cache.train) == 5  # "hello<|endoftext|>" minus its last token, which went to val
    with pytest.raises(ValueError, match=r"train split has 5 tokens, but block_size = 8 needs at least 9"):
        train_batch(cache.train, seed=0, step=0, rank=0, world_size=1, batch_size=1, block_size=8)


def python(code: str, cache_dir: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), APPROXGPT_CACHE=str(cache_dir))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **popen)


@pytest.mark.slow
def test_build_killed_mid_write_is_not_taken_as_complete(tmp_path):
    cache_dir = tmp_path / "cache"
    builder = python("from data import DataConfig, build_token_cache\n"
                     "build_token_cache(DataConfig(num_proc=1))\n", cache_dir, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(cache_dir.glob("tokens/*/train.*.tmp")):
        assert builder.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    folder = cache_folder(DataConfig(cache_dir=str(cache_dir)))
    assert open_token_cache(folder) is None
    assert not (folder / "meta.json").exists()


@pytest.mark.slow
def test_concurrent_builders_build_once_and_share(tmp_path):
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    code = ("import os, sys, time\n"
            "from data import DataConfig, build_token_cache\n"
            f"open(os.path.join({str(tmp_path)!r}, 'ready-' + sys.argv[1]), 'w').close()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.002)\n"
            "print(build_token_cache(DataConfig(num_proc=1)).meta['build_id'])\n")
    builders = [python(code, cache_dir, str(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for i in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported: release them together
        assert time.monotonic() < deadline and all(b.poll() is None for b in builders)
        time.sleep(0.01)
    go.touch()
    outputs = [b.communicate(timeout=120) for b in builders]
    assert all(b.returncode == 0 for b in builders), outputs
    build_ids = {stdout.strip() for stdout, _ in outputs}
    assert len(build_ids) == 1
    assert sum("waiting for another process" in stderr for _, stderr in outputs) == 1
    assert len(list(cache_dir.glob("tokens/*"))) == 1

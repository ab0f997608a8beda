"""Corpora as streams of document strings: the embedded stdlib corpus, local text files, HF datasets.

Each source also has an *identity* (a JSON-able dict that changes whenever the documents may change),
which keys the token cache, and a one-line description for logs and cache metadata.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.config import DataConfig
from data.tokenizer import encode_document, get_encoding

# The embedded corpus is the interpreter's standard library minus third-party code (site-packages)
# and the test suites (test/ alone is ~40% of the stdlib and is mostly repetitive assertions).
EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
# Files generated when CPython is built (paths, compiler flags) differ between builds of the same
# version; leaving them out makes the corpus the same for every build of one Python version.
BUILD_SPECIFIC_PREFIXES = ("config-", "_sysconfigdata_")


class CorpusError(RuntimeError):
    """A corpus that cannot be read: no matching files, an unreadable file, an unreachable hub..."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def embedded_files() -> list[Path]:
    """The stdlib's *.py files, sorted by relative POSIX path so every machine reads them in one order."""
    root = stdlib_root()
    relative = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder).relative_to(root)
        # Pruning in place keeps os.walk out of site-packages, which can be larger than the stdlib.
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_STDLIB_DIRS
                         and not (here == Path(".") and d.startswith(BUILD_SPECIFIC_PREFIXES))]
        relative += [(here / name).as_posix() for name in names if name.endswith(".py")
                     and not (here == Path(".") and name.startswith(BUILD_SPECIFIC_PREFIXES))]
    return [root / name for name in sorted(relative)]


def local_files(cfg: DataConfig) -> list[Path]:
    """cfg.path itself, or the files under the folder cfg.path that match cfg.glob, sorted."""
    root = Path(cfg.path).expanduser().resolve()
    if root.is_file():
        return [root]
    # Directories can match a glob such as **/*.txt too; broken links are kept so reading them fails loudly.
    matches = sorted((p for p in root.glob(cfg.glob) if not p.is_dir()),
                     key=lambda p: p.relative_to(root).as_posix())
    if not matches:
        raise CorpusError(f"no files in folder {root} match data.glob = {cfg.glob!r}")
    return matches


def load_documents(cfg: DataConfig) -> Iterator[str]:
    """The corpus as document strings, in a deterministic order (for hf: the dataset's own order)."""
    if cfg.source == "embedded":
        # errors="replace": every stdlib file is UTF-8 today, but one stray byte must not stop training.
        return (path.read_text(encoding="utf-8", errors="replace") for path in embedded_files())
    if cfg.source == "files":
        return _read_local_files(local_files(cfg))
    return _read_hf_dataset(cfg)


def _read_local_files(files: list[Path]) -> Iterator[str]:
    # Imported here: `datasets` takes about a second to import and the embedded corpus does not need it.
    import datasets

    try:
        # sample_by="document": one row per file (the default would make every line a document).
        # data_files are glob patterns to `datasets`, so names such as "a[1].txt" must be escaped.
        rows = iter(datasets.load_dataset("text", data_files=[glob.escape(str(f)) for f in files],
                                          split="train", sample_by="document", streaming=True))
    except FileNotFoundError as error:  # e.g. a broken symbolic link; the message names the file
        raise CorpusError(f"cannot read data file: {error}") from error
    # Row i is file i, which lets a decoding or permission error name its file.
    for path in files:
        try:
            yield next(rows)["text"]
        except (OSError, UnicodeDecodeError) as error:
            raise CorpusError(f"cannot read {path} as UTF-8 text ({type(error).__name__}: {error}); "
                              f"remove it or narrow data.glob") from error


def _read_hf_dataset(cfg: DataConfig) -> Iterator[str]:
    import datasets

    hub_help = (f"could not reach the Hugging Face Hub for dataset {cfg.hf_name!r}. To work offline, "
                f"download it once on a machine with internet into HF_HOME (datasets.load_dataset("
                f"{cfg.hf_name!r}, {cfg.hf_config!r}, split={cfg.hf_split!r})), point HF_HOME at that "
                f"copy and set HF_DATASETS_OFFLINE=1 (HF_HUB_OFFLINE=1 also skips the network retries); "
                f"or export the text to files and use data.source = 'files'")
    try:
        dataset = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split,
                                        streaming=cfg.streaming)
        columns = dataset.column_names  # None for some streamed datasets whose features are unknown
        if columns is not None and cfg.text_field not in columns:
            raise CorpusError(f"dataset {cfg.hf_name!r} has no column data.text_field = "
                              f"{cfg.text_field!r}; its columns are {columns}")
        if columns is not None:
            dataset = dataset.select_columns([cfg.text_field])  # skip decoding the other columns
        for row in itertools.islice(dataset, cfg.max_documents):
            yield row[cfg.text_field]
    except ConnectionError as error:  # datasets raises the builtin ConnectionError, offline mode included
        raise CorpusError(f"{hub_help} ({error})") from error


def source_identity(cfg: DataConfig) -> dict:
    """Everything that determines the documents; a change here means a new token cache."""
    if cfg.source == "embedded":
        files = embedded_files()
        root = stdlib_root()
        listing = "\n".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files)
        return {"source": "embedded", "stdlib": str(root), "python": sys.version,
                "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if cfg.source == "files":
        root = Path(cfg.path).expanduser().resolve()
        files = local_files(cfg)
        listing = "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in files)
        return {"source": "files", "path": str(root), "glob": None if root.is_file() else cfg.glob,
                "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    # `streaming` is left out: it changes how rows arrive, not which rows.
    return {"source": "hf", "name": cfg.hf_name, "config": cfg.hf_config, "split": cfg.hf_split,
            "text_field": cfg.text_field, "max_documents": cfg.max_documents}


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "embedded":
        return f"Python {sys.version.split()[0]} standard library at {stdlib_root()}"
    if cfg.source == "files":
        root = Path(cfg.path).expanduser().resolve()
        return str(root) if root.is_file() else f"{root}/{cfg.glob}"
    cap = f", first {cfg.max_documents} documents" if cfg.max_documents else ""
    return f"HF dataset {cfg.hf_name} ({cfg.hf_config or 'default'}, split {cfg.hf_split}{cap})"


def expected_document_count(cfg: DataConfig) -> int | None:
    """For progress bars; None when unknown before reading (an uncapped HF dataset)."""
    if cfg.source == "embedded":
        return len(embedded_files())
    if cfg.source == "files":
        return len(local_files(cfg))
    return cfg.max_documents


@dataclass(frozen=True)
class CorpusStats:
    files: int
    bytes: int     # UTF-8 bytes of the documents as read (universal newlines)
    tokens: int    # including one <|endoftext|> per document


def embedded_corpus_stats(tokenizer: str = "byte") -> CorpusStats:
    """Size of the embedded corpus, for the README. Tokenizes it in-process (~1 s with 'byte')."""
    encoding = get_encoding(tokenizer)
    files = n_bytes = n_tokens = 0
    for text in load_documents(DataConfig(source="embedded", tokenizer=tokenizer)):
        files += 1
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(encode_document(encoding, text))
    return CorpusStats(files=files, bytes=n_bytes, tokens=n_tokens)

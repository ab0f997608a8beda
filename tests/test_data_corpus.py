"""Corpora: the embedded stdlib corpus, local text files through `datasets`, HF datasets offline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import CorpusError, DataConfig, embedded_corpus_stats, load_documents
from data.corpus import EXCLUDED_STDLIB_DIRS, embedded_files, stdlib_root

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_corpus_is_the_stdlib_without_tests_or_site_packages():
    root = stdlib_root()
    names = [p.relative_to(root).as_posix() for p in embedded_files()]
    assert names == sorted(names)
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(names)
    for name in names:
        assert name.endswith(".py")
        assert not EXCLUDED_STDLIB_DIRS.intersection(name.split("/")[:-1]), name
        assert not name.startswith(("config-", "_sysconfigdata_")), name
    assert (root / "test").is_dir() and not any(n.startswith("test/") for n in names)


def test_embedded_documents_are_the_files_in_order():
    files = embedded_files()
    documents = list(load_documents(DataConfig(source="embedded")))
    assert len(documents) == len(files)
    for index in (0, len(files) // 2, -1):
        assert documents[index] == files[index].read_text(encoding="utf-8", errors="replace")


def test_embedded_corpus_stats_count_bytes_files_and_byte_tokens():
    stats = embedded_corpus_stats("byte")
    assert stats.files == len(embedded_files())
    assert stats.bytes > 5_000_000
    assert stats.tokens == stats.bytes + stats.files  # one token per byte plus one <|endoftext|> per file


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_folder_of_files_gives_one_document_per_matching_file_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "second\n\nwith a blank line\nand lines\n")
    write(tmp_path / "a.txt", "first")
    write(tmp_path / "sub/c.txt", "third ☃")
    write(tmp_path / "sub/d[1]*.txt", "glob characters in a name")
    write(tmp_path / "notes.md", "not matched by the glob")
    (tmp_path / "folder.txt").mkdir()  # a directory that matches the glob is not a file
    documents = list(load_documents(DataConfig(source="files", path=str(tmp_path))))
    assert documents == ["first", "second\n\nwith a blank line\nand lines\n", "third ☃",
                         "glob characters in a name"]


def test_single_file_is_one_document_and_glob_is_honoured(tmp_path):
    file = write(tmp_path / "book.md", "line 1\nline 2\n")
    assert list(load_documents(DataConfig(source="files", path=str(file)))) == ["line 1\nline 2\n"]
    cfg = DataConfig(source="files", path=str(tmp_path), glob="*.md")
    assert list(load_documents(cfg)) == ["line 1\nline 2\n"]


def test_folder_without_matching_files_names_folder_and_glob(tmp_path):
    write(tmp_path / "data.csv", "a,b")
    with pytest.raises(CorpusError) as error:
        list(load_documents(DataConfig(source="files", path=str(tmp_path), glob="**/*.txt")))
    assert str(tmp_path.resolve()) in str(error.value) and "'**/*.txt'" in str(error.value)


def test_binary_file_error_names_the_file(tmp_path):
    write(tmp_path / "a.txt", "fine")
    bad = write(tmp_path / "b.txt", b"\xff\xfe\x00\x81 not utf-8")
    documents = load_documents(DataConfig(source="files", path=str(tmp_path)))
    assert next(documents) == "fine"
    with pytest.raises(CorpusError, match="UTF-8") as error:
        next(documents)
    assert str(bad) in str(error.value)


def test_unreadable_file_error_names_the_file(tmp_path):
    # Tests run as root here, so chmod cannot make a file unreadable; a dangling link can.
    write(tmp_path / "a.txt", "fine")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "deleted-target.txt")
    with pytest.raises(CorpusError) as error:
        list(load_documents(DataConfig(source="files", path=str(tmp_path))))
    assert "gone.txt" in str(error.value)


def test_unreachable_hub_fails_fast_with_offline_instructions(tmp_path):
    # A subprocess, because huggingface_hub reads HF_HUB_OFFLINE once at import. Offline mode is how a
    # machine without network fails at once instead of retrying for ~25 s.
    code = ("from data import DataConfig, load_documents\n"
            "list(load_documents(DataConfig(source='hf', hf_name='someone/some-corpus', streaming=True)))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("data.corpus.CorpusError:"), result.stderr
    assert "'someone/some-corpus'" in last_line and "Hugging Face Hub" in last_line
    assert "HF_DATASETS_OFFLINE=1" in last_line and "data.source = 'files'" in last_line

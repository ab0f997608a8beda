"""Typed, validated data configuration (the `data:` section of an experiment YAML)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import tiktoken
from pydantic import Field, model_validator

from common import StrictModel


def default_cache_dir() -> str:
    # One cache per machine, shared by every run and every Ray trial on it.
    return os.environ.get("APPROXGPT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "approxgpt"))


def is_known_tokenizer(name: str) -> bool:
    """'byte' or an encoding tiktoken can name (whether its files are available is checked later)."""
    return name == "byte" or name in tiktoken.list_encoding_names()


class DataConfig(StrictModel):
    # embedded: the Python standard library's source text that ships with the interpreter (offline).
    # files: a local text file or a folder of them.  hf: a Hugging Face dataset by name.
    source: Literal["embedded", "files", "hf"] = "embedded"
    path: str | None = None            # source=files: a file or a folder
    glob: str = "**/*.txt"             # source=files with a folder: which files to read
    hf_name: str | None = None         # source=hf: e.g. "HuggingFaceFW/fineweb-edu"
    hf_config: str | None = None       # source=hf: the dataset configuration (subset) name
    hf_split: str = "train"
    text_field: str = "text"
    streaming: bool = False            # source=hf: stream instead of downloading the whole split
    max_documents: int | None = Field(default=None, ge=1)  # cap, mostly for streaming
    tokenizer: str = "byte"            # "byte" (offline) or any tiktoken encoding name, e.g. "gpt2"
    val_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    val_tokens: int = Field(default=65536, ge=1)  # size of the fixed validation set
    cache_dir: str = Field(default_factory=default_cache_dir)
    num_proc: int = Field(default=2, ge=1)  # tokenization workers

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if not is_known_tokenizer(self.tokenizer):
            raise ValueError(f"data.tokenizer = {self.tokenizer!r} is not a known encoding; valid: 'byte' "
                             f"or one of tiktoken's {', '.join(sorted(tiktoken.list_encoding_names()))}")
        if self.source == "files":
            if not self.path:
                raise ValueError("data.path is required when data.source = 'files' "
                                 "(a text file or a folder of text files)")
            p = Path(self.path).expanduser()
            if not p.exists():
                raise ValueError(f"data.path = {self.path!r}: no such file or folder")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.source = 'hf' "
                             "(a Hugging Face dataset name such as 'HuggingFaceFW/fineweb-edu')")
        return self


# Vocabulary sizes of the encodings we know without loading them, so a config validates offline.
# The byte encoding is 256 bytes + <|endoftext|> (see data/tokenizer.py).
KNOWN_VOCAB_SIZES = {
    "byte": 257,
    "gpt2": 50257,
    "r50k_base": 50257,
    "p50k_base": 50281,
    "cl100k_base": 100277,
    "o200k_base": 200019,
}

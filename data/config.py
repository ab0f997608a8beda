"""Typed, validated data configuration (the `data:` section of an experiment YAML)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def default_cache_dir() -> str:
    # One cache per machine, shared by every run and every Ray trial on it.
    return os.environ.get("APPROXGPT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "approxgpt"))


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """nanoGPT's trick: pad the embedding table to a multiple of 64 for faster matmuls."""
    return -(-n_vocab // multiple) * multiple

"""One strict pydantic base for every config section and one formatter for its errors."""
from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo in an ablation axis must not run the
    # wrong experiment; assignments are validated too, so a config changed in code stays valid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """nanoGPT's trick: the embedding table's rows, n_vocab rounded up to a multiple of 64 so the
    matmuls hit fast kernel shapes (byte: 257 -> 320, gpt2: 50257 -> 50304)."""
    return -(-n_vocab // multiple) * multiple


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_validation_error(exc: ValidationError, source: str | Callable[[str, str], str], *,
                            key_path: Callable[[tuple], str] = _dotted,
                            unknown_key_hint: str | None = None) -> str:
    """One readable line per problem: where it came from, the key path, the bad value, what is valid.

    source: a file name, or a function of the problem's (key path, message) (e.g. naming the
    command-line override that set the key rather than the YAML file). key_path: how a pydantic location is written
    for the user (e.g. `model.approx.x` -> `approx.x`). unknown_key_hint: appended to unknown-key
    lines (e.g. which example file lists the valid keys)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = key_path(loc)
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        first = msg.split(" ", 1)[0]
        origin = source(where, msg) if callable(source) else source
        if err["type"] == "extra_forbidden":
            parent = key_path(loc[:-1]) or "top level"
            hint = f"; {unknown_key_hint}" if unknown_key_hint else ""
            lines.append(f"{origin}: unknown key {where!r} (in {parent}){hint}")
        elif err["type"] in ("value_error", "assertion_error"):
            # Our validators name the key paths themselves; prefix the section they ran in when
            # the message does not already start with a dotted path.
            prefix = f"{where}: " if where and "." not in first else ""
            lines.append(f"{origin}: {prefix}{msg}")
        elif err["type"] == "missing":
            lines.append(f"{origin}: {where}: required key is missing")
        else:
            lines.append(f"{origin}: {where} = {_short(err.get('input'))}: {msg}")
    return "\n".join(lines)

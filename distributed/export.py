"""The final model on disk: nanoGPT-keyed safetensors for us, a Hugging Face GPT-2 copy for everyone else.

    final/
      model.safetensors      nanoGPT state-dict keys; GPT(config).load_state_dict(strict=True) takes it
      config.json            {"format", "model": GPTConfig (dense), "encoding", "meta"}
      hf/config.json         GPT2Config fields, written by hand (transformers is not a run-time dep)
      hf/model.safetensors   GPT2LMHeadModel keys and layout
      hf/generation_config.json   eos/bos ids, the sampling defaults of distributed.sample, and the
                             padding ids of the embedding table suppressed (no token decodes them)
      hf/tokenizer.json, hf/tokenizer_config.json   the run's tiktoken encoding as a Hugging Face
                             byte-level BPE (AutoTokenizer.from_pretrained(final/hf)), byte included
      hf/README.md           what is there; says so when the tokenizer could not be written

Only dense models are exported: the full-rank finish (or the caller) runs `model.realize()` first, so
the file format never has to know about factorised layers or compressed attention.

The directory is built next to its destination and swapped in with renames, so a kill at any point
leaves either the previous complete export or the new complete one, never a mix of the two.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import load_file, save_file

from data.tokenizer import END_OF_TEXT
from model import GPT, GPTConfig
from model.config import ApproxConfig

FORMAT = "approxgpt-final"
FORMAT_VERSION = 1

# The four linear sites of a block. HF's GPT-2 uses the same key names but stores them as Conv1D,
# whose weight is (in, out): the transpose of nn.Linear's (out, in).
LINEAR_SITES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NORMS = ("ln_1", "ln_2")


def dense_state_keys(n_layer: int, bias: bool) -> set[str]:
    """The exact state-dict keys of a dense nanoGPT model with `n_layer` blocks."""
    suffixes = ("weight", "bias") if bias else ("weight",)
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    keys |= {f"transformer.ln_f.{s}" for s in suffixes}
    for i in range(n_layer):
        for module in (*NORMS, *LINEAR_SITES):
            keys |= {f"transformer.h.{i}.{module}.{s}" for s in suffixes}
    return keys


def dense_config(model: GPT) -> GPTConfig:
    """The GPTConfig that builds `model`'s dense structure: its current block count, no approximations.

    A grown model may have fewer or more blocks than the experiment's config says at any moment, so
    the block count comes from the model itself."""
    return model.config.model_copy(
        update={"n_layer": len(model.transformer.h), "approx": ApproxConfig()})


def _nanogpt_state(model: GPT) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    config = model.config
    expected = dense_state_keys(len(model.transformer.h), config.bias)
    if set(state) != expected:
        extra = sorted(set(state) - expected)
        missing = sorted(expected - set(state))
        raise ValueError(
            "save_final needs a dense model; call model.realize() first. "
            f"Keys not in a dense nanoGPT model: {extra[:6]}{' ...' if len(extra) > 6 else ''}; "
            f"missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    # safetensors refuses tensors that share storage, and lm_head.weight IS transformer.wte.weight.
    # Storing both (the head as a copy) keeps the file a complete nanoGPT state dict, so
    # load_state_dict(strict=True) works; loading copies both into the one tied parameter.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """nanoGPT state -> GPT2LMHeadModel state (lm_head omitted: HF ties it to wte on load)."""
    hf = {k: state[k] for k in ("transformer.wte.weight", "transformer.wpe.weight")}
    d = config.n_embd

    def norm(prefix: str) -> None:
        weight = state[f"{prefix}.weight"]
        hf[f"{prefix}.weight"] = weight
        # GPT-2 always has biases; a bias-free LayerNorm or Linear is the same function with zeros.
        hf[f"{prefix}.bias"] = state.get(f"{prefix}.bias", torch.zeros(d, dtype=weight.dtype))

    for i in range(config.n_layer):
        for name in NORMS:
            norm(f"transformer.h.{i}.{name}")
        for site in LINEAR_SITES:
            key = f"transformer.h.{i}.{site}"
            weight = state[f"{key}.weight"]
            hf[f"{key}.weight"] = weight.t().contiguous()  # Linear (out, in) -> Conv1D (in, out)
            hf[f"{key}.bias"] = state.get(f"{key}.bias",
                                          torch.zeros(weight.shape[0], dtype=weight.dtype))
    norm("transformer.ln_f")
    return hf


def _hf_config(config: GPTConfig, dtype: torch.dtype, eot_token: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,  # the padded size: the embedding table's real shape
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu",  # exact erf GELU, as nn.GELU(); GPT-2's default is tanh
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1 / sqrt(head_dim), as ours
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _generation_config(config: GPTConfig, eot_token: int | None, n_vocab: int | None) -> dict:
    # The defaults of distributed.sample (temperature 0.8, top-k 200), and the padding rows of the
    # embedding table (ids >= n_vocab) never sampled: no tokenizer id decodes them.
    padding = list(range(n_vocab, config.vocab_size)) if n_vocab is not None else []
    return {"bos_token_id": eot_token, "eos_token_id": eot_token, "pad_token_id": eot_token,
            "do_sample": True, "temperature": 0.8, "top_k": 200, "max_length": config.block_size,
            **({"suppress_tokens": padding} if padding else {})}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies
    (Hugging Face's ByteLevel pre-tokenizer and decoder) are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer_json(encoding: tiktoken.Encoding) -> dict:
    """A tiktoken encoding as a Hugging Face `tokenizers` byte-level BPE that encodes every text to
    the same ids: tiktoken's split regex, then BPE whose merge priorities are tiktoken's ranks
    (ignore_merges: a piece that is a token is taken whole, as tiktoken does).

    tiktoken has no public accessor for its split pattern; `_pat_str` is read behind a guard."""
    pattern = getattr(encoding, "_pat_str", None)
    if not isinstance(pattern, str):
        raise RuntimeError(f"tiktoken {tiktoken.__version__} no longer exposes Encoding._pat_str, the "
                           "split pattern the exported tokenizer needs")
    to_text = _byte_to_unicode()
    specials = {t: encoding.encode_single_token(t) for t in sorted(encoding.special_tokens_set)}
    ranks = {}
    for i in range(encoding.max_token_value + 1):
        if i in specials.values():
            continue
        try:
            ranks[encoding.decode_single_token_bytes(i)] = i
        except KeyError:  # an id no token has (cl100k has gaps below its special tokens)
            continue
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        # Every split of the token into two tokens of lower rank is a merge of this priority, as
        # transformers' tiktoken converter writes them.
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in ranks and token[k:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in pairs]
    merges.sort()
    text = lambda b: "".join(to_text[c] for c in b)  # noqa: E731
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,
                  "vocab": {text(token): rank for token, rank in ranks.items()},
                  "merges": [[text(a), text(b)] for *_, a, b in merges]},
    }


def _write_hf_tokenizer(hf_dir: Path, encoding: tiktoken.Encoding | None, encoding_name: str,
                        block_size: int) -> str | None:
    """Write tokenizer.json + tokenizer_config.json; return why not (None when written)."""
    if encoding is None:
        return (f"save_final was given no encoding object for {encoding_name!r}, so no tokenizer files "
                f"were written; use data.get_encoding({encoding_name!r}) (tiktoken) to encode")
    try:
        tokenizer = hf_tokenizer_json(encoding)
    except Exception as error:  # noqa: BLE001 - the weights still export; the README says why not
        return f"the {encoding_name!r} tokenizer could not be converted ({type(error).__name__}: {error})"
    eot = END_OF_TEXT if END_OF_TEXT in encoding.special_tokens_set else None
    _write_json(hf_dir / "tokenizer.json", tokenizer)
    _write_json(hf_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
        "model_max_length": block_size, "clean_up_tokenization_spaces": False})
    return None


def _hf_readme(encoding_name: str, tokenizer_missing: str | None) -> str:
    lines = ["# Hugging Face GPT-2 copy of this run's final model", "",
             "    transformers.GPT2LMHeadModel.from_pretrained(this_folder)"]
    if tokenizer_missing is None:
        lines += [f"    transformers.AutoTokenizer.from_pretrained(this_folder)   # {encoding_name!r}, "
                  "as tiktoken encodes"]
    else:
        lines += ["", f"NO TOKENIZER FILES: {tokenizer_missing}. "
                  "AutoTokenizer.from_pretrained(this_folder) would not give the run's tokenizer."]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_final(model: GPT, out_dir: str | Path, *, encoding_name: str,
               extra_meta: dict | None = None, eot_token: int | None = None,
               encoding: tiktoken.Encoding | None = None) -> Path:
    """Write the dense `model` to `out_dir` (see the module docstring) and return `out_dir`.

    encoding_name: the tokenizer the model was trained with (data.get_encoding's name), so sampling
    decodes with the same one. extra_meta: JSON-serialisable run facts (steps, tokens, val loss...).
    eot_token: the encoding's end-of-text id, recorded as GPT-2's bos/eos ids in hf/config.json
    (taken from `encoding` when given). encoding: the tiktoken encoding itself, exported as
    hf/tokenizer.json; without it hf/README.md and a warning say there is no tokenizer.
    """
    if encoding is not None and eot_token is None:
        eot_token = encoding.eot_token
    out_dir = Path(out_dir)
    state = _nanogpt_state(model)
    config = dense_config(model)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": config.model_dump(mode="json"),
            "encoding": encoding_name, "meta": dict(extra_meta or {})}
    json.dumps(meta)  # fail before writing anything if extra_meta is not serialisable

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        _write_json(staging / "config.json", meta)
        (staging / "hf").mkdir()
        dtype = state["transformer.wte.weight"].dtype
        # HF refuses safetensors files without the {"format": "pt"} header.
        save_file(_hf_state(state, config), staging / "hf" / "model.safetensors",
                  metadata={"format": "pt"})
        _write_json(staging / "hf" / "config.json", _hf_config(config, dtype, eot_token))
        _write_json(staging / "hf" / "generation_config.json", _generation_config(
            config, eot_token, encoding.n_vocab if encoding is not None else None))
        missing = _write_hf_tokenizer(staging / "hf", encoding, encoding_name, config.block_size)
        (staging / "hf" / "README.md").write_text(_hf_readme(encoding_name, missing))
        if missing is not None:
            print(f"warning: {out_dir / 'hf'}: {missing}", file=sys.stderr, flush=True)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the complete `staging` directory.

    rename() cannot replace a non-empty directory, so an existing export is first renamed aside and
    deleted only after the new one is in place. A kill between the two renames leaves the previous
    export intact under `<name>.old-*` next to it (load_final reports it)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, previous / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def final_dir(path: str | Path) -> Path:
    """A run directory's final/ folder, or `path` itself when it already is an export."""
    path = Path(path)
    return path if (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        else path / "final"


def load_final(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Load an export written by save_final. `path`: a run directory or its final/ folder.

    Returns (model in eval mode, the parsed config.json: "model", "encoding", "meta")."""
    directory = final_dir(path)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        message = (f"no final model in {str(path)!r} (looked for {directory / 'config.json'} and "
                   f"{directory / 'model.safetensors'})")
        interrupted = sorted(directory.parent.glob(f".{directory.name}.old-*/{directory.name}"))
        if interrupted:
            message += f"; an interrupted save_final left the previous export in {interrupted[-1]}"
        raise FileNotFoundError(message)
    config_file = directory / "config.json"
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file} is not readable JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not an {FORMAT} export "
                         f"(format = {meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        model = GPT(GPTConfig.model_validate(meta.get("model")))
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{config_file}: its \"model\" section is not a valid GPTConfig "
                         f"({str(error).splitlines()[0]})") from None
    try:
        model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    except Exception as error:  # noqa: BLE001 - safetensors' own error type, or a shape/key mismatch
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{directory / 'model.safetensors'} does not hold the model {config_file} "
                         f"describes ({type(error).__name__}: {first[:200]})") from None
    return model.to(device).eval(), meta

"""The final model on disk: nanoGPT-keyed safetensors for us, a Hugging Face GPT-2 copy for everyone else.

    final/
      model.safetensors      nanoGPT state-dict keys; GPT(config).load_state_dict(strict=True) takes it
      config.json            {"format", "model": GPTConfig (dense), "encoding", "meta"}
      hf/config.json         GPT2Config fields, written by hand (transformers is not a run-time dep)
      hf/model.safetensors   GPT2LMHeadModel keys and layout

Only dense models are exported: the full-rank finish (or the caller) runs `model.realize()` first, so
the file format never has to know about factorised layers or compressed attention.

The directory is built next to its destination and swapped in with renames, so a kill at any point
leaves either the previous complete export or the new complete one, never a mix of the two.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_final(model: GPT, out_dir: str | Path, *, encoding_name: str,
               extra_meta: dict | None = None, eot_token: int | None = None) -> Path:
    """Write the dense `model` to `out_dir` (see the module docstring) and return `out_dir`.

    encoding_name: the tokenizer the model was trained with (data.get_encoding's name), so sampling
    decodes with the same one. extra_meta: JSON-serialisable run facts (steps, tokens, val loss...).
    eot_token: the encoding's end-of-text id, recorded as GPT-2's bos/eos ids in hf/config.json.
    """
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
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / 'config.json'} is not an {FORMAT} export "
                         f"(format = {meta.get('format')!r})")
    model = GPT(GPTConfig.model_validate(meta["model"]))
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return model.to(device).eval(), meta

"""The final export: our safetensors round-trip exactly, and the HF GPT-2 copy computes the same logits."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"  # from_pretrained on a local folder must never try the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from distributed.export import dense_state_keys, load_final, save_final  # noqa: E402
from model import GPT, ApproxConfig, GPTConfig  # noqa: E402

APPROX = {
    "attn_qkv": {"kind": "abba", "r1": 4, "r2": 4},
    "attn_proj": {"kind": "lowrank", "rank": 8},
    "mlp_fc": {"kind": "lowrank", "rank": 8},
    "mlp_proj": {"kind": "abba", "r1": 2, "r2": 3},
    "attention": {"kind": "compressed", "slots": 2, "chunk": 8, "window": 4, "allow_costlier": True},
}


def small_config(bias: bool = True, approx: dict | None = None) -> GPTConfig:
    # vocab 80 is "padded" (not what any tokenizer uses) so the HF vocab_size must come from the model
    return GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=80, bias=bias,
                     approx=approx or {})


def randomized(model: GPT) -> GPT:
    """Give every parameter (biases, norms included) a random value: a freshly initialised model has
    zero biases and unit norms, which would hide a dropped or transposed bias/norm in the export."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(mean=0.1 if p.dim() == 1 else 0.0, std=0.2)
    return model.eval()


def tokens(config: GPTConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (3, config.block_size), generator=g)


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, targets=idx)[0]  # with targets, forward returns every position's logits


@pytest.mark.parametrize("bias", [True, False])
def test_roundtrip_is_exact_and_strict(tmp_path, bias):
    torch.manual_seed(0)
    model = randomized(GPT(small_config(bias)))
    save_final(model, tmp_path / "final", encoding_name="byte", extra_meta={"step": 7})

    loaded, meta = load_final(tmp_path)  # a run directory resolves to its final/
    idx = tokens(model.config)
    assert torch.equal(all_logits(loaded, idx), all_logits(model, idx))
    assert meta["encoding"] == "byte" and meta["meta"] == {"step": 7}

    # The file is a complete nanoGPT state dict: a fresh dense GPT takes it with strict=True,
    # lm_head included (tied weights are stored twice, so both keys exist).
    state = load_file(tmp_path / "final" / "model.safetensors")
    assert set(state) == dense_state_keys(2, bias)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    fresh = GPT(GPTConfig.model_validate(meta["model"]))
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # tying survives the load


@pytest.mark.parametrize("bias", [True, False])
def test_hf_gpt2_export_gives_the_same_logits(tmp_path, bias):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = randomized(GPT(small_config(bias)))
    save_final(model, tmp_path / "final", encoding_name="byte", eot_token=3)

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final" / "hf").eval()
    assert hf.config.vocab_size == 80 and hf.config.n_positions == 24
    assert hf.config.eos_token_id == 3
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx = tokens(model.config, seed=2)
    with torch.no_grad():
        hf_logits = hf(idx).logits
    torch.testing.assert_close(hf_logits, all_logits(model, idx), rtol=0, atol=1e-4)


def test_realized_approximated_model_exports(tmp_path):
    torch.manual_seed(2)
    model = randomized(GPT(small_config(approx=APPROX)))
    with pytest.raises(ValueError, match="realize"):
        save_final(model, tmp_path / "final", encoding_name="byte")
    assert not (tmp_path / "final").exists()  # a refused save leaves nothing behind

    model.realize()
    save_final(model, tmp_path / "final", encoding_name="byte")
    loaded, meta = load_final(tmp_path / "final")
    assert meta["model"]["approx"] == ApproxConfig().model_dump(mode="json")
    idx = tokens(model.config)
    assert torch.equal(all_logits(loaded, idx), all_logits(model, idx))

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final" / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, all_logits(model, idx), rtol=0, atol=1e-4)


def test_grown_model_exports_its_current_depth(tmp_path):
    # A layer-wise run's model may hold fewer blocks than config.n_layer; the export describes the
    # structure that exists.
    model = randomized(GPT(small_config().model_copy(update={"n_layer": 3}), n_initial_layers=2))
    save_final(model, tmp_path / "final", encoding_name="byte")
    loaded, meta = load_final(tmp_path)
    assert meta["model"]["n_layer"] == 2 and loaded.n_blocks == 2


def test_overwrite_replaces_whole_export_and_leaves_no_temporaries(tmp_path):
    first = randomized(GPT(small_config()))
    save_final(first, tmp_path / "final", encoding_name="byte", extra_meta={"which": "first"})
    second = randomized(GPT(small_config(bias=False)))
    save_final(second, tmp_path / "final", encoding_name="gpt2", extra_meta={"which": "second"})

    loaded, meta = load_final(tmp_path)
    assert meta["meta"] == {"which": "second"} and meta["encoding"] == "gpt2"
    idx = tokens(second.config)
    assert torch.equal(all_logits(loaded, idx), all_logits(second, idx))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    hf_config = json.loads((tmp_path / "final" / "hf" / "config.json").read_text())
    assert hf_config["activation_function"] == "gelu" and hf_config["layer_norm_epsilon"] == 1e-5


def test_load_final_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no final model"):
        load_final(tmp_path)


def _toy_bpe():
    """A tiktoken BPE with merges (the real gpt2 files need the network): byte tokens plus a few
    merged ones, GPT-2's split pattern, <|endoftext|> last."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for token in (b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"de", b"def", b" def", b"  ",
                  b"    ", b"se", b"el", b"lf", b"self"):
        ranks.setdefault(token, len(ranks))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="toy", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.mark.parametrize("which", ["toy-bpe", "byte"])
def test_hf_export_has_the_runs_tokenizer_and_generation_config(tmp_path, which):
    transformers = pytest.importorskip("transformers")
    from data.tokenizer import get_encoding

    encoding = _toy_bpe() if which == "toy-bpe" else get_encoding("byte")
    model = randomized(GPT(small_config().model_copy(update={"vocab_size": 320})))
    save_final(model, tmp_path / "final", encoding_name=encoding.name, encoding=encoding)
    hf_dir = tmp_path / "final" / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "def the(self):\n    the thing is in the self-defined ingest, naïve café 🙂 <|endoftext|>x"
    ids = tokenizer.encode(text)
    assert ids == encoding.encode(text, allowed_special="all")
    assert tokenizer.decode(ids) == text and tokenizer.eos_token_id == encoding.eot_token
    generation = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert generation.eos_token_id == encoding.eot_token and generation.max_length == 24
    assert generation.suppress_tokens == list(range(encoding.n_vocab, 320))  # the padding rows
    assert "NO TOKENIZER" not in (hf_dir / "README.md").read_text()


def test_hf_export_without_an_encoding_says_there_is_no_tokenizer(tmp_path, capsys):
    save_final(randomized(GPT(small_config())), tmp_path / "final", encoding_name="gpt2")
    assert not (tmp_path / "final" / "hf" / "tokenizer.json").exists()
    assert "NO TOKENIZER FILES" in (tmp_path / "final" / "hf" / "README.md").read_text()
    assert "no tokenizer files" in capsys.readouterr().err

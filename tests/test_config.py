"""The config system: YAML + dotted overrides -> one validated object, one-line errors."""
from pathlib import Path

import pytest

from distributed.config import ConfigError, ExperimentConfig, load_config
from model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/experiments/tiny.yaml"
GPT2 = ROOT / "configs/experiments/gpt2-124m.yaml"


def test_tiny_config_validates_with_every_approximation_on():
    cfg = load_config(TINY)
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.model, GPTConfig)
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.block_size) == (4, 128, 128)
    assert cfg.data.source == "embedded" and cfg.data.tokenizer == "byte"
    assert m.vocab_size == 320  # 257 byte tokens padded to a multiple of 64
    block = cfg.approx.for_block(0)
    assert block.attention.kind == "compressed"
    assert all(getattr(block, s).approximated for s in ("attn_qkv", "attn_proj", "mlp_fc", "mlp_proj"))
    assert cfg.schedule.layerwise and cfg.schedule.freeze_previous and cfg.schedule.full_rank_finish


def test_gpt2_config_validates():
    cfg = load_config(GPT2)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50304)
    assert cfg.data.tokenizer == "gpt2" and cfg.data.source == "hf" and cfg.data.hf_name
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage == 2


def test_dotted_overrides_reach_the_model_config():
    cfg = load_config(TINY, ["model.n_layer=6", "approx.mlp_fc.rank=16", "train.learning_rate=1e-3",
                             "approx.attn_qkv={kind: dense}", "approx.layers={2: {mlp_proj: {kind: dense}}}"])
    assert cfg.model.n_layer == 6
    assert cfg.model.approx.mlp_fc.rank == 16 and cfg.approx is cfg.model.approx
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.approx.for_block(0).attn_qkv.kind == "dense"
    assert cfg.approx.for_block(2).mlp_proj.kind == "dense"
    assert cfg.approx.for_block(1).mlp_proj.kind == "lowrank"


def test_round_trip_through_yaml_dict():
    cfg = load_config(TINY, ["approx.layers={1: {attention: {kind: full}}}"])
    again = ExperimentConfig.model_validate(cfg.to_yaml_dict())
    assert again == cfg


@pytest.mark.parametrize("overrides, expected", [
    (["modle.n_layer=3"], ["unknown key 'modle'"]),
    (["approx.mlp_fc.rnak=3"], ["unknown key 'approx.mlp_fc.rnak'"]),
    (["model.n_layer=abc"], ["model.n_layer", "'abc'", "integer"]),
    (["model.n_head=5"], ["n_embd = 128", "n_head = 5"]),
    (["approx.mlp_fc.rank=0"], ["approx.mlp_fc.rank", "greater than or equal to 1"]),
    (["approx.mlp_fc.rank=129"], ["approx.mlp_fc.rank = 129", "valid: 1..128"]),
    (["approx.attn_qkv.r2=200"], ["approx.attn_qkv.r2 = 200", "valid: 1..128"]),
    (["approx.layers={1: {mlp_fc: {kind: lowrank, rank: 999}}}"], ["approx.layers.1.mlp_fc.rank = 999"]),
    (["approx.attention.chunk=129"], ["approx.attention.chunk = 129", "block_size = 128"]),
    (["approx.attention.slots=17"], ["approx.attention.slots = 17", "chunk = 16", "valid: 1..16"]),
    (["approx.attention.window=64"], ["approx.attention = compressed(slots=2,chunk=16,window=64) costs",
                                      "approx.attention.allow_costlier: true"]),
    (["approx.attention={kind: linformer, k: 16, window: 16, chunk: 32}"],
     ["approx.attention", "'linformer' was renamed 'compressed'", "{kind: compressed, slots:"]),
    (["approx.mlp_fc.kind=abba", "approx.mlp_fc.r1=null"], ["approx.mlp_fc", "needs `r1` and `r2`"]),
    (["approx.mlp_fc.kind=sparse"], ["approx.mlp_fc.kind", "'dense', 'lowrank' or 'abba'"]),
    (["schedule.layerwise=false"], ["schedule.freeze_previous", "schedule.layerwise"]),
    (["data.source=files", "data.path=/definitely/not/here"], ["data.path", "/definitely/not/here"]),
    (["data.source=hf"], ["data.hf_name"]),
    (["deepspeed.zero_stage=4"], ["deepspeed.zero_stage = 4"]),
    (["train.min_lr=1.0"], ["train.min_lr = 1.0", "train.learning_rate"]),
])
def test_bad_input_fails_fast_with_one_readable_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    message = str(info.value)
    assert message.count("\n") == 0, message
    # The override is blamed, not the YAML file the user did not touch.
    assert any(message.startswith(f"override {item!r}: ") for item in overrides), message
    for fragment in expected:
        assert fragment in message, message


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        load_config(missing)


def test_malformed_override_is_named():
    with pytest.raises(ConfigError, match="model.n_layer"):
        load_config(TINY, ["model.n_layer"])
    with pytest.raises(ConfigError, match="model.n_layer.*not a section"):
        load_config(TINY, ["model.n_layer.x=1"])


def test_non_mapping_yaml_is_rejected(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)

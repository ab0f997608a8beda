"""Bad input, as a new user would type it, against the trainer, the config loader, the data, resume,
the sampler and the export: each is refused before any process group starts or any file is written,
with a non-zero exit, a few lines, no traceback, naming the key or path and the value.

In-process (`main(argv)`), so the whole table runs in seconds; the cases that reach the data build a
token cache of a few KB."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed import checkpoint as ckpt
from distributed import sample as sample_cli
from distributed import train as train_cli
from distributed.config import load_config
from distributed.export import save_final
from model import GPT, GPTConfig

CORPUS = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(600))

BASE = {
    "name": "bad-inputs", "seed": 3,
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "data": {"source": "files", "tokenizer": "byte", "val_fraction": 0.1, "val_tokens": 256},
    "schedule": {"layerwise": True, "initial_layers": 1},
    "train": {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "eval_interval": 2},
    "deepspeed": {"zero_stage": 1},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A valid tiny experiment (its own corpus and token cache) and a valid final/ export."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "corpus.txt").write_text(CORPUS)
    (root / "empty").mkdir()
    (root / "other").mkdir()
    (root / "other" / "notes.md").write_text(CORPUS)
    (root / "short.txt").write_text("x = 1\n" * 3)                     # 18 tokens < block_size + 1
    (root / "tail.txt").write_text("y = 2\n" * 49)                     # val = 10% of 295 < 33
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["data"].update(path=str(root / "corpus.txt"), cache_dir=str(root / "cache"))
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    (root / "broken.yaml").write_text("model: {n_layer: 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "a_file").write_text("not a folder")

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=320))
    save_final(model, root / "sample" / "final", encoding_name="byte")
    return root, config


def fake_checkpoint(run_dir: Path, cfg_dict: dict, *, world_size: int = 1, version: int = ckpt.FORMAT_VERSION):
    """A complete checkpoint's marker (what preflight reads; the weights are never reached)."""
    tag = ckpt.tag_for_step(2)
    (ckpt.checkpoint_root(run_dir) / tag).mkdir(parents=True)
    meta = {"format": ckpt.FORMAT, "version": version, "tag": tag, "step": 2, "world_size": world_size,
            "config": cfg_dict}
    (ckpt.checkpoint_root(run_dir) / tag / ckpt.META_FILE).write_text(json.dumps(meta))
    (ckpt.checkpoint_root(run_dir) / ckpt.LATEST_FILE).write_text(tag)


def config_of(config: Path, *overrides: str) -> dict:
    return load_config(config, list(overrides)).to_yaml_dict()


# (id, what is run, expected fragments of the message). A "train" case gives overrides (plus an
# optional setup(root, config, run_dir) -> extra argv); a "sample" case gives argv after the run dir.
CUDA = torch.cuda.is_available()
CASES = [
    # ---- the YAML file and the command line
    ("config-missing", ("train", [], lambda r, c, d: ["--config", str(r / "nope.yaml")]), ["nope.yaml", "does not exist"]),
    ("config-not-yaml", ("train", [], lambda r, c, d: ["--config", str(r / "broken.yaml")]), ["broken.yaml", "not valid YAML"]),
    ("config-a-list", ("train", [], lambda r, c, d: ["--config", str(r / "list.yaml")]), ["list.yaml", "mapping"]),
    ("unknown-section", ("train", ["modle.n_layer=2"], None), ["'modle'", "unknown key"]),
    ("unknown-key", ("train", ["train.max_step=5"], None), ["'train.max_step'", "unknown key"]),
    ("not-an-int", ("train", ["model.n_layer=two"], None), ["model.n_layer", "'two'", "integer"]),
    ("zero-steps", ("train", ["train.max_steps=0"], None), ["train.max_steps", "0", "greater than or equal to 1"]),
    ("heads-do-not-divide", ("train", ["model.n_head=3"], None), ["n_embd = 32", "n_head = 3"]),
    ("rank-too-large", ("train", ["approx.mlp_fc={kind: lowrank, rank: 99}"], None), ["approx.mlp_fc.rank = 99", "valid: 1..32"]),
    ("abba-without-r2", ("train", ["approx.mlp_fc={kind: abba, r1: 2}"], None), ["approx.mlp_fc", "r2"]),
    ("layer-override-out-of-range", ("train", ["approx.layers={5: {mlp_fc: {kind: dense}}}"], None), ["approx.layers.5", "0..1"]),
    ("zero-stage-4", ("train", ["deepspeed.zero_stage=4"], None), ["deepspeed.zero_stage = 4"]),
    ("precision-fp8", ("train", ["deepspeed.precision=fp8"], None), ["deepspeed.precision", "'fp8'", "bf16"]),
    ("backend-mpi", ("train", ["deepspeed.backend=mpi"], None), ["deepspeed.backend", "'mpi'", "gloo"]),
    ("offload-without-zero", ("train", ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], None),
     ["deepspeed.offload_optimizer", "zero_stage"]),
    ("min-lr-above-lr", ("train", ["train.min_lr=1.0"], None), ["train.min_lr = 1.0", "train.learning_rate"]),
    ("warmup-past-end", ("train", ["train.warmup_steps=50"], None), ["train.warmup_steps = 50", "train.max_steps = 4"]),
    ("fewer-steps-than-stages", ("train", ["train.max_steps=1"], None), ["train.max_steps = 1", "2 stages"]),
    ("freeze-without-growth", ("train", ["schedule.layerwise=false", "schedule.freeze_previous=true"], None),
     ["schedule.freeze_previous", "schedule.layerwise"]),
    ("keep-one-checkpoint", ("train", ["train.keep_checkpoints=1"], None), ["train.keep_checkpoints", "1"]),
    ("val-fraction-above-1", ("train", ["data.val_fraction=1.5"], None), ["data.val_fraction", "1.5"]),
    ("files-without-path", ("train", ["data.path=null"], None), ["data.path", "required"]),
    ("data-path-missing", ("train", ["data.path=/no/such/corpus.txt"], None), ["data.path", "/no/such/corpus.txt"]),
    ("hf-without-name", ("train", ["data.source=hf"], None), ["data.hf_name"]),
    ("unknown-tokenizer", ("train", ["data.tokenizer=gpt5"], None), ["data.tokenizer = 'gpt5'", "'byte'", "gpt2"]),
    ("vocab-below-tokenizer", ("train", ["model.vocab_size=100"], None), ["model.vocab_size = 100", "257"]),
    ("override-without-value", ("train", ["model.n_layer"], None), ["'model.n_layer'", "key.path=value"]),
    ("override-into-a-value", ("train", ["model.n_layer.x=1"], None), ["model.n_layer", "not a section"]),
    ("override-bad-yaml", ("train", ["model.n_layer=[1"], None), ["model.n_layer=[1", "not valid YAML"]),
    ("override-empty-segment", ("train", ["model..n_layer=1"], None), ["empty key segment"]),
    ("argparse-no-config", ("train", [], lambda r, c, d: ["--config"]), ["--config", "expected one argument"]),
    # ---- this machine and launcher
    *([] if CUDA else [
        ("nccl-without-cuda", ("train", ["deepspeed.backend=nccl"], None), ["deepspeed.backend = 'nccl'", "gloo"]),
        ("fp16-without-cuda", ("train", ["deepspeed.precision=fp16"], None), ["deepspeed.precision = 'fp16'", "fp32"]),
    ]),
    ("kill-rank-outside-world", ("train", ["debug.kill_at_step=2", "debug.kill_rank=3"], None),
     ["debug.kill_rank = 3", "1 process", "0..0"]),
    # ---- the data
    ("empty-folder", ("train", [], lambda r, c, d: [f"data.path={r / 'empty'}"]), ["empty", "data.glob = '**/*.txt'"]),
    ("glob-matches-nothing", ("train", [], lambda r, c, d: [f"data.path={r / 'other'}"]), ["other", "data.glob"]),
    ("train-split-too-short", ("train", [], lambda r, c, d: [f"data.path={r / 'short.txt'}"]),
     ["train split", "model.block_size = 32", "at least 33"]),
    ("val-split-too-short", ("train", [], lambda r, c, d: [f"data.path={r / 'tail.txt'}"]),
     ["val split", "model.block_size = 32", "data.val_fraction"]),
    ("batch-larger-than-corpus", ("train", ["train.micro_batch_size=5000"], None),
     ["train.micro_batch_size", "5000", "windows"]),
    ("tokenizer-files-offline", ("train", ["data.tokenizer=r50k_base"], None), ["data.tokenizer = 'r50k_base'", "TIKTOKEN_CACHE_DIR"]),
    # ---- the run directory and resume
    ("run-dir-is-a-file", ("train", [], lambda r, c, d: ["--run-dir", str(r / "a_file")]), ["a_file", "is a file"]),
    ("resume-without-checkpoint", ("train", [], lambda r, c, d: ["--resume"]), ["--resume", "no complete checkpoint"]),
    ("resume-other-config-no-config-yaml",
     ("train", ["train.learning_rate=0.01"], lambda r, c, d: fake_checkpoint(d, config_of(c)) or []),
     ["different config", "train.learning_rate", "0.0006 -> 0.01"]),
    ("resume-other-world-size", ("train", [], lambda r, c, d: fake_checkpoint(d, config_of(c), world_size=2) or []),
     ["2 processes", "got 1"]),
    ("resume-old-format", ("train", [], lambda r, c, d: fake_checkpoint(d, config_of(c), version=1) or []),
     ["format version 1", "--run-dir"]),
    # ---- the sampler and the export it reads
    ("sample-device-cuda", ("sample", ["--device", "cuda"], None), (["no CUDA device", "cpu"] if not CUDA else None)),
    ("sample-device-nonsense", ("sample", ["--device", "gpu0"], None), ["--device 'gpu0'", "cpu"]),
    ("sample-no-run-dir", ("sample", [], "empty"), ["no such run directory"]),
    ("sample-corrupt-config-json", ("sample", [], "corrupt-config"), ["config.json", "not readable JSON"]),
    ("sample-wrong-format", ("sample", [], "wrong-format"), ["config.json", "approxgpt-final"]),
    ("sample-bad-model-section", ("sample", [], "bad-model"), ["config.json", "GPTConfig"]),
    ("sample-truncated-weights", ("sample", [], "truncated-weights"), ["model.safetensors"]),
    ("sample-unknown-encoding", ("sample", [], "bad-encoding"), ["config.json", "'klingon'"]),
    ("sample-zero-tokens", ("sample", ["--max-new-tokens", "0"], None), ["--max-new-tokens", ">= 1"]),
    ("sample-negative-temperature", ("sample", ["--temperature", "-1"], None), ["--temperature", ">= 0"]),
]
CASES = [c for c in CASES if c[2] is not None]


def _damaged_export(root: Path, how: str, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    if how == "empty":
        return target
    shutil.copytree(root / "sample", target)
    config = target / "final" / "config.json"
    meta = json.loads(config.read_text())
    if how == "corrupt-config":
        config.write_text(config.read_text()[:40])
    elif how == "wrong-format":
        config.write_text(json.dumps({**meta, "format": "nanogpt"}))
    elif how == "bad-model":
        config.write_text(json.dumps({**meta, "model": {**meta["model"], "n_head": 3}}))
    elif how == "truncated-weights":
        weights = target / "final" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "bad-encoding":
        config.write_text(json.dumps({**meta, "encoding": "klingon"}))
    return target


def _call(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


@pytest.mark.parametrize("name, call, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_a_few_lines_before_any_work(name, call, fragments, world, tmp_path, capsys,
                                                           monkeypatch):
    root, config = world
    # tiktoken must find no BPE files and reach no server (a closed local port answers at once).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-empty"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    kind, args, extra = call
    run_dir = tmp_path / "run"
    if kind == "train":
        tail = extra(root, config, run_dir) if extra is not None else []
        paths = {"--config": str(config), "--run-dir": str(run_dir)}
        if tail[:1] == ["--config"] or tail[:1] == ["--run-dir"]:  # this case replaces a path
            if len(tail) == 1:
                paths.pop(tail[0])  # ... or gives the flag without its value
                argv = [tail[0]]
            else:
                paths[tail[0]] = tail[1]
                argv = []
            tail = []
        else:
            argv = []
        argv = [x for flag, value in paths.items() for x in (flag, value)] + argv + tail + args
        code = _call(train_cli.main, argv)
    else:
        target = _damaged_export(root, extra, tmp_path) if isinstance(extra, str) else root / "sample"
        code = _call(sample_cli.main, [str(target), "--max-new-tokens", "1", *args] if "--max-new-tokens" not in args
                     else [str(target), *args])
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if not l.startswith("tokenizing")]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 4, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if kind == "train":  # refused before anything was written to the run directory
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.jsonl").exists()


def test_the_table_covers_at_least_forty_bad_inputs():
    assert len(CASES) >= 40

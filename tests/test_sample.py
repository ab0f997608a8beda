"""python -m distributed.sample: decodes what the model samples, reproducibly, from a run's final/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import get_encoding
from distributed.export import load_final, save_final
from distributed.sample import SEPARATOR, missing_final_message, sample_tokens
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def "
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory whose final/ holds a small random byte-level model.

    The padding rows of the (tied) embedding, ids the byte tokenizer cannot decode, get a large norm
    so an unmasked sampler would pick them almost every step."""
    encoding = get_encoding("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[encoding.n_vocab:] *= 500.0
    run = tmp_path_factory.mktemp("run")
    save_final(model, run / "final", encoding_name="byte")
    return run


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distributed.sample", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def expected_samples(run_dir: Path, seed: int, num_samples: int) -> list[tuple[str, list[int]]]:
    """What the CLI should print, computed in-process with the same loop and one seeded generator."""
    model, meta = load_final(run_dir)
    encoding = get_encoding(meta["encoding"])
    prompt = torch.tensor([encoding.encode(PROMPT)])
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        out = sample_tokens(model, prompt, NEW_TOKENS, temperature=1.0, top_k=None,
                            n_vocab=encoding.n_vocab, generator=generator)
        samples.append((encoding.decode(out[0].tolist()), out[0, prompt.size(1):].tolist()))
    return samples


def test_cli_prints_prompt_plus_sampled_tokens_deterministically(run_dir):
    args = (run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--temperature", 1.0,
            "--top-k", 0, "--num-samples", 2, "--device", "cpu")
    first = run_sample(*args, "--seed", 5)
    assert first.returncode == 0, first.stderr
    again = run_sample(*args, "--seed", 5)
    other = run_sample(*args, "--seed", 6)

    samples = expected_samples(run_dir, seed=5, num_samples=2)
    for text, new_ids in samples:
        assert text.startswith(PROMPT) and len(new_ids) == NEW_TOKENS
        assert all(i < get_encoding("byte").n_vocab for i in new_ids)  # padding ids never sampled
    assert first.stdout == samples[0][0] + "\n" + SEPARATOR + "\n" + samples[1][0] + "\n"
    assert samples[0][0] != samples[1][0]
    assert again.stdout == first.stdout
    assert other.stdout != first.stdout


def test_greedy_is_top_k_one(run_dir):
    model, _ = load_final(run_dir)
    idx = torch.tensor([get_encoding("byte").encode(PROMPT)])
    greedy = sample_tokens(model, idx, 40, temperature=0.0, n_vocab=257)  # runs past block_size
    top1 = sample_tokens(model, idx, 40, temperature=1.0, top_k=1, n_vocab=257,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1) and greedy.size(1) == idx.size(1) + 40


def test_missing_final_is_a_clear_error(tmp_path):
    result = run_sample(tmp_path, "--prompt", PROMPT)
    assert result.returncode == 1
    assert str(tmp_path) in result.stderr and "no final model" in result.stderr
    assert "Traceback" not in result.stderr and "DeepSpeed" not in result.stderr

    # DeepSpeed's checkpoint layout (<save_dir>/<tag>/mp_rank_00_model_states.pt): an unfinished run.
    tag = tmp_path / "checkpoints" / "global_step10"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    message = missing_final_message(tmp_path)
    assert "DeepSpeed checkpoints" in message and str(tmp_path / "checkpoints") in message

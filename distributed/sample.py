"""Sample text from a finished run:  python -m distributed.sample RUN_DIR --prompt "def "

Loads RUN_DIR/final (written by distributed.export.save_final), encodes the prompt with the run's own
tokenizer, samples continuations and prints them, one per sample, separated by a rule.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from data.tokenizer import TokenizerUnavailableError, get_encoding
from distributed.export import final_dir, load_final
from model import GPT

SEPARATOR = "-" * 40


@torch.no_grad()
def sample_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, n_vocab: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """nanoGPT's sampling loop (GPT.generate) with two additions a CLI needs:

    - `n_vocab`: only the tokenizer's real ids are sampled. The embedding table is padded (byte: 257
      ids in a 320-row table); an undertrained model gives the padding rows probability, and those
      ids cannot be decoded.
    - `generator`: an explicit RNG, so a seed reproduces the same text without touching global state.
    temperature 0 means greedy decoding.
    """
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        logits = logits[:, -1, :n_vocab].float()
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def missing_final_message(run_dir: Path) -> str:
    if not run_dir.exists():
        return f"{run_dir}: no such run directory"
    message = f"{run_dir} has no final model yet (no {final_dir(run_dir)})"
    # DeepSpeed writes <tag>/mp_rank_00_model_states.pt for every checkpoint it saves.
    checkpoints = sorted({p.parent.parent for p in run_dir.rglob("mp_rank_*_model_states.pt")})
    if checkpoints:
        message += (f"; it has DeepSpeed checkpoints in {', '.join(map(str, checkpoints))}, so the run "
                    "stopped before its end: resume it to completion to write final/")
    return message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distributed.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (or its final/ folder)")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k likeliest; 0 = all")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("max_new_tokens", "num_samples") if getattr(args, name) < 1]
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0 (got {args.temperature}; 0 = greedy)")
    if args.top_k < 0:
        problems.append(f"--top-k must be >= 0 (got {args.top_k}; 0 = all)")
    if problems:  # one line each, without argparse's usage block
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    return args


def device_problem(name: str) -> str | None:
    """Why `--device name` cannot be used on this machine, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; valid: cpu, cuda, cuda:N"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"--device {name}: this machine has no CUDA device; valid here: cpu"
        if device.index is not None and device.index >= count:
            return f"--device {name}: this machine has {count} CUDA device(s); valid: cuda:0..cuda:{count - 1}"
    elif device.type not in ("cpu", "mps"):
        return f"--device {name!r}: unsupported device type; valid: cpu, cuda, cuda:N"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = device_problem(args.device)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model, meta = load_final(args.run_dir, device=args.device)
    except FileNotFoundError:
        print(f"error: {missing_final_message(args.run_dir)}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        encoding = get_encoding(meta.get("encoding"))
    except (ValueError, TokenizerUnavailableError) as error:
        print(f"error: {final_dir(args.run_dir) / 'config.json'}: encoding {meta.get('encoding')!r}: "
              f"{str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    # allowed_special: a prompt may start a fresh document with <|endoftext|>.
    prompt_ids = encoding.encode(args.prompt, allowed_special="all")
    if not prompt_ids:
        print("error: the prompt encodes to no tokens; give at least one character", file=sys.stderr)
        return 2

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    for i in range(args.num_samples):
        out = sample_tokens(model, idx, args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, n_vocab=encoding.n_vocab, generator=generator)
        if i:
            print(SEPARATOR)
        print(encoding.decode(out[0].tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

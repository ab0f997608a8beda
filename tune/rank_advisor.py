"""The rank advisor: how much rank each weight of a trained dense model actually uses.

    python -m tune.rank_advisor RUN_DIR_OR_FINAL_DIR [--share 0.9] [--json]

For each linear weight W of each block (attention qkv/proj, MLP fc/proj) with singular values s:

* energy rank: the smallest k whose top-k singular values keep `share` of the spectral energy,
  sum(s[:k]^2) >= share * sum(s^2) -- the rank a low-rank factorisation needs to keep that much of W
  in Frobenius norm (Eckart-Young);
* stable rank: ||W||_F^2 / ||W||_2^2 = sum(s^2) / max(s)^2, a noise-robust "effective" rank that is
  never above the true rank.

The suggested ranks (median over layers of the energy rank) map onto the approximations' config
keys: `approx.<site>.rank` for low-rank layers, and r1 = r2 = ceil(sqrt(rank)) for Hadamard ABBA,
whose weight (B1 A1) * (B2 A2) reaches rank r1 * r2. The Linformer k compresses the sequence, not a
weight, so the weights say nothing about it. The rank search seeds its first trials with these.

Works on plain weight tensors from `distributed.export.load_final` (any dense export: ours, or a
nanoGPT/GPT-2 state dict converted by it).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

# nanoGPT state-dict name of each approximable linear site.
SITE_KEYS = {"attn_qkv": "attn.c_attn.weight", "attn_proj": "attn.c_proj.weight",
             "mlp_fc": "mlp.c_fc.weight", "mlp_proj": "mlp.c_proj.weight"}
_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WeightRank:
    layer: int
    site: str
    shape: tuple[int, int]
    full_rank: int         # min(out, in): the most any factorisation can need
    energy_rank: int       # smallest k keeping `share` of sum(s^2)
    stable_rank: float     # sum(s^2) / max(s)^2


def energy_rank(singular_values: torch.Tensor, share: float) -> int:
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share = {share}: must be in (0, 1]")
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # The small tolerance keeps share=1.0 from demanding rank beyond round-off.
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=torch.float64)).item()) + 1


def stable_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double()
    return float((s ** 2).sum() / s.max() ** 2) if s.numel() and s.max() > 0 else 0.0


def analyse_weight(weight: torch.Tensor, share: float) -> tuple[int, float]:
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return energy_rank(s, share), stable_rank(s)


@dataclass(frozen=True)
class Spectrum:
    layer: int
    site: str
    shape: tuple[int, int]
    singular_values: torch.Tensor


def spectra(state: dict[str, torch.Tensor]) -> list[Spectrum]:
    """Singular values of every approximable weight in a dense nanoGPT-keyed state dict (the SVDs
    are the only expensive part, so they are computed once for any number of shares)."""
    by_key = {v: k for k, v in SITE_KEYS.items()}
    out = []
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match and match.group(2) in by_key:
            out.append(Spectrum(int(match.group(1)), by_key[match.group(2)], tuple(tensor.shape),
                                torch.linalg.svdvals(tensor.detach().to(torch.float64))))
    if not out:
        raise ValueError("no block weights found: expected a dense nanoGPT state dict with keys like "
                         "transformer.h.0.attn.c_attn.weight")
    return sorted(out, key=lambda w: (w.layer, list(SITE_KEYS).index(w.site)))


def ranks_at(weights: list[Spectrum], share: float) -> list[WeightRank]:
    return [WeightRank(w.layer, w.site, w.shape, min(w.shape), energy_rank(w.singular_values, share),
                       stable_rank(w.singular_values)) for w in weights]


def analyse_state_dict(state: dict[str, torch.Tensor], share: float = 0.9) -> list[WeightRank]:
    """Energy and stable rank of every approximable weight in a dense nanoGPT-keyed state dict."""
    return ranks_at(spectra(state), share)


def suggested_ranks(ranks: list[WeightRank]) -> dict[str, int]:
    """Config overrides (dotted key -> rank) from the median energy rank of each site over layers."""
    out = {}
    for site in SITE_KEYS:
        values = [w.energy_rank for w in ranks if w.site == site]
        if not values:
            continue
        rank = max(1, int(math.ceil(statistics.median(values))))
        root = max(1, math.ceil(math.sqrt(rank)))
        out[f"approx.{site}.rank"] = rank
        out[f"approx.{site}.r1"] = root
        out[f"approx.{site}.r2"] = root
    return out


def load_spectra(path: str | Path) -> list[Spectrum]:
    """Singular values of a dense export's weights (a run directory or its final/ folder)."""
    from distributed.export import load_final

    model, _ = load_final(path)
    with torch.no_grad():
        return spectra({k: v.detach().cpu() for k, v in model.state_dict().items()})


def advise(path: str | Path, share: float = 0.9) -> tuple[list[WeightRank], dict[str, int]]:
    """Load a dense export and analyse its weights at one share of spectral energy."""
    ranks = ranks_at(load_spectra(path), share)
    return ranks, suggested_ranks(ranks)


def format_table(ranks: list[WeightRank], suggestion: dict[str, int], share: float) -> str:
    lines = [f"{'layer':>5}  {'site':9}  {'shape':>11}  {'full':>5}  {f'{share:.0%} energy':>10}  "
             f"{'stable':>7}"]
    for w in ranks:
        shape = f"{w.shape[0]}x{w.shape[1]}"
        lines.append(f"{w.layer:>5}  {w.site:9}  {shape:>11}  {w.full_rank:>5}  {w.energy_rank:>10}  "
                     f"{w.stable_rank:>7.1f}")
    lines.append("")
    lines.append(f"suggested (median over layers of the rank keeping {share:.0%} of the energy; "
                 "ABBA: r1 = r2 = ceil(sqrt(rank))):")
    lines += [f"  {key}={value}" for key, value in suggestion.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Energy and stable rank of a dense model's weights.")
    parser.add_argument("path", help="a run directory with final/, or a final/ export folder")
    parser.add_argument("--share", type=float, default=0.9,
                        help="share of the spectral energy to keep (default 0.9)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.share <= 1:
        print(f"error: --share must be in (0, 1], got {args.share}", file=sys.stderr)
        return 2
    try:
        ranks, suggestion = advise(args.path, args.share)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SafetensorError, KeyError, RuntimeError, OSError) as exc:
        # a garbage or truncated model.safetensors, a config.json without its sections
        print(f"error: {args.path}: cannot read the final model ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else exc!r})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"share": args.share, "weights": [asdict(w) for w in ranks],
                          "suggested": suggestion}, indent=1))
    else:
        print(format_table(ranks, suggestion, args.share))
    return 0


if __name__ == "__main__":
    sys.exit(main())

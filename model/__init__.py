"""approxgpt's model: a nanoGPT-compatible GPT with approximated layers, growth, freezing, realize."""
from model.config import (SITES, ApproxConfig, AttentionSpec, BlockApprox, BlockApproxOverride,
                          GPTConfig, LinearSpec)
from model.gpt import GPT
from model.kinds import ParamRole

__all__ = ["GPT", "GPTConfig", "ApproxConfig", "BlockApprox", "BlockApproxOverride", "LinearSpec",
           "AttentionSpec", "SITES", "ParamRole"]

from model.config import (SITES, ApproxConfig, AttentionSpec, BlockApprox, BlockApproxOverride,
                          GPTConfig, LinearSpec)

"""Parameter and FLOP accounting against hand counts, and against PyTorch's own FLOP counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig

# n_layer=2, n_embd=8, n_head=2, vocab=16, block_size=T=4, biases on.
DENSE = dict(block_size=4, vocab_size=16, n_layer=2, n_head=2, n_embd=8)
# Block 0 approximated (lowrank qkv, abba mlp_fc, compressed slots=2 chunk=2 window=1), block 1 dense.
BLOCK0_APPROX = {"attn_qkv": {"kind": "lowrank", "rank": 2},
                 "mlp_fc": {"kind": "abba", "r1": 2, "r2": 2},
                 "attention": {"kind": "compressed", "slots": 2, "chunk": 2, "window": 1,
                               "allow_costlier": True}}
MIXED = DENSE | {"approx": {"layers": {0: BLOCK0_APPROX}}}

# Hand counts.
# Dense block: ln_1 16 + c_attn 8*24+24 = 216 + c_proj 64+8 = 72 + ln_2 16 + c_fc 8*32+32 = 288
#              + mlp.c_proj 32*8+8 = 264                                               = 872
# Approximated block 0: ln_1 16 + c_attn a 2*8 + b 24*2 + bias 24 = 88 + c_proj 72
#              + core: w_p n_head*head_dim*slots = 16, ln_k and ln_v 2*4 each = 16
#              + ln_2 16 + c_fc a1 16 + b1 64 + a2 16 + b2 64 + bias 32 = 192
#              + mlp.c_proj 264                                                        = 680
# Embeddings: wte 16*8 = 128 (tied with lm_head: counted once) + wpe 4*8 = 32 = 160; ln_f 16.
DENSE_PARAMS = 160 + 2 * 872 + 16  # 1920
MIXED_PARAMS = 160 + 680 + 872 + 16  # 1728
# Forward FLOPs per token (T = 4):
# Dense block: linears 2*(8*24 + 8*8 + 8*32 + 32*8) = 1536, causal attention 2*2*d*(T+1)/2 = 80
#              -> 1616.
# Block 0 (T = 4 is n = 2 chunks of 2; chunk 1 pools segment 0 into 2 slots):
#          c_attn 2*2*(8+24) = 128;
#          scores/values: every query scores (n-1)*slots + window + chunk = 5 keys: 2*2*5*d = 160;
#          pooling per sequence: logits, P^T K, P^T V, each 2*d*slots*chunk = 64 for the one
#          completed segment -> 16 per token each (logits: 16, a matmul with the weight W_P);
#          c_proj 128; c_fc 2*2*2*(8+32) = 320; mlp.c_proj 512 -> 128+16+160+32+128+320+512 = 1296.
# lm_head 2*8*16 = 256.
DENSE_BLOCK, APPROX_BLOCK, HEAD = 1616, 1296, 256


def test_param_counts_by_hand():
    assert GPT(GPTConfig(**DENSE)).param_counts() == {"total": DENSE_PARAMS, "trainable": DENSE_PARAMS}
    model = GPT(GPTConfig(**MIXED))
    assert model.param_counts() == {"total": MIXED_PARAMS, "trainable": MIXED_PARAMS}
    model.freeze_embeddings()
    model.freeze_layer(0)
    assert model.param_counts() == {"total": MIXED_PARAMS, "trainable": MIXED_PARAMS - 160 - 680}
    model.unfreeze_embeddings()
    model.unfreeze_layer(0)
    model.freeze_layer(1)
    assert model.param_counts()["trainable"] == MIXED_PARAMS - 872


def test_dense_flops_by_hand():
    flops = GPT(GPTConfig(**DENSE)).training_flops_per_token(seq_len=4)
    assert flops.forward == 2 * DENSE_BLOCK + HEAD == 3488
    assert flops.training == 3 * 3488  # everything trainable: fwd + grad wrt inputs + wrt weights
    assert [b.forward for b in flops.blocks] == [DENSE_BLOCK, DENSE_BLOCK]
    # Full causal attention grows with T: 2*2*d*(T+1)/2 per layer, (T+1)/2 keys per query on average.
    longer = GPT(GPTConfig(**(DENSE | {"block_size": 8}))).training_flops_per_token()
    assert longer.seq_len == 8 and longer.forward == 3488 + 2 * (2 * 8 * (9 - 5))


def test_mixed_model_flops_by_hand_under_freezing():
    model = GPT(GPTConfig(**MIXED))
    flops = model.training_flops_per_token(seq_len=4)
    assert [b.forward for b in flops.blocks] == [APPROX_BLOCK, DENSE_BLOCK]
    assert flops.forward == APPROX_BLOCK + DENSE_BLOCK + HEAD == 3168
    assert flops.training == 3 * 3168

    # Frozen prefix (embeddings + block 0) runs forward only; block 1 trains (3x); lm_head is frozen
    # (tied to wte) but ln_f below it trains, so it costs forward + input gradient (2x).
    model.freeze_embeddings()
    model.freeze_layer(0)
    flops = model.training_flops_per_token(seq_len=4)
    assert [b.training for b in flops.blocks] == [APPROX_BLOCK, 3 * DENSE_BLOCK]
    assert flops.lm_head.training == 2 * HEAD
    assert flops.training == 1296 + 4848 + 512

    # Also freeze block 1's ln_1: the first trainable linear (c_attn) gets an input that needs no
    # gradient, so it costs forward + weight gradient only: 2 * 384.
    model.transformer.h[1].ln_1.requires_grad_(False)
    block1 = model.training_flops_per_token(seq_len=4).blocks[1].training
    assert block1 == 2 * 384 + 3 * 80 + 3 * 128 + 3 * 512 + 3 * 512 == 4464

    # A frozen block above trainable ones: linears 2x (input gradient only), attention matmuls 3x
    # (gradients to q, k and v are all needed).
    model = GPT(GPTConfig(**MIXED))
    model.freeze_layer(1)
    flops = model.training_flops_per_token(seq_len=4)
    assert [b.training for b in flops.blocks] == [3 * APPROX_BLOCK, 2 * 1536 + 3 * 80]
    assert flops.training == 3888 + 3312 + 768


def _measured_training_flops_per_token(model, cfg):
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    # PyTorch's counter does not see inside the CPU flash-attention kernel; the math backend runs the
    # same attention as plain bmm's, which it counts.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    return counter.get_total_flops() / idx.numel()


@pytest.mark.parametrize("freeze", ["none", "prefix", "top", "prefix_and_ln"])
def test_training_flops_match_what_autograd_executes(freeze):
    # Every matmul of this model is an mm/bmm PyTorch's counter sees (compressed core on SDPA's math
    # backend, which computes every score of every chunk, masked or not, as the fused kernel does).
    cfg = GPTConfig(**(DENSE | {"block_size": 8, "n_layer": 3, "approx": {
        "attn_proj": {"kind": "lowrank", "rank": 3}, "mlp_proj": {"kind": "abba", "r1": 2, "r2": 3},
        "attention": {"kind": "compressed", "slots": 3, "chunk": 4, "window": 2,
                      "allow_costlier": True}}}))
    torch.manual_seed(0)
    model = GPT(cfg)
    if freeze in ("prefix", "prefix_and_ln"):
        model.freeze_embeddings()
        model.freeze_layer(0)
    if freeze == "prefix_and_ln":
        model.transformer.h[1].ln_1.requires_grad_(False)
    if freeze == "top":
        model.freeze_layer(2)
    assert _measured_training_flops_per_token(model, cfg) == model.training_flops_per_token().training


def test_summary_describes_blocks_freezing_and_totals():
    model = GPT(GPTConfig(**MIXED))
    model.freeze_embeddings()
    model.freeze_layer(0)
    text = model.summary(seq_len=4)
    lines = text.splitlines()
    block0 = next(line for line in lines if line.startswith("block 0"))
    block1 = next(line for line in lines if line.startswith("block 1"))
    assert "attn_qkv=lowrank(r=2)" in block0 and "mlp_fc=abba(r1=2,r2=2)" in block0
    assert "compressed(slots=2,chunk=2,window=1)" in block0 and "[frozen]" in block0
    assert "attn_qkv=dense" in block1 and "attention=full" in block1 and "[frozen]" not in block1
    assert "embeddings: frozen" in text
    assert f"total={MIXED_PARAMS:,} trainable={MIXED_PARAMS - 840:,}" in text
    assert f"training={1296 + 4848 + 512:,}" in text


@pytest.mark.parametrize("T,slots,chunk,window", [(16, 2, 4, 0), (16, 3, 8, 5), (12, 1, 3, 2), (8, 2, 8, 0)])
def test_compressed_core_flops_match_pytorchs_counter(T, slots, chunk, window):
    """The kind's forward FLOPs are what the core computes (forward, and backward: 3x for a trainable
    core whose inputs need gradients), including the pooling matmuls; T = chunk has no slots."""
    from model.kinds import ATTENTION_KINDS, AttentionSpec
    spec = AttentionSpec(kind="compressed", slots=slots, chunk=chunk, window=window, allow_costlier=True)
    kind = ATTENTION_KINDS["compressed"]
    n_head, head_dim, batch = 2, 4, 3
    core = kind.build(spec, T, n_head * head_dim, n_head, dropout=0.0)
    q, k, v = (torch.randn(batch, n_head, T, head_dim, requires_grad=True) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out = core(q, k, v)
    forward = counter.get_total_flops()
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out.sum().backward()
    counted = kind.forward_flops(spec, T, n_head * head_dim, n_head)
    assert forward == (counted.projection + counted.activation) * batch * T
    assert counter.get_total_flops() == 2 * forward
    assert kind.param_count(spec, n_head * head_dim, n_head) == sum(p.numel() for p in core.parameters())


def test_linear_kinds_count_the_parameters_they_build():
    from model.kinds import LINEAR_KINDS, LinearSpec
    for spec in (LinearSpec(), LinearSpec(kind="lowrank", rank=3), LinearSpec(kind="abba", r1=2, r2=3)):
        for bias in (True, False):
            layer = LINEAR_KINDS[spec.kind].build(spec, 8, 12, bias, 0.02)
            assert spec.of_kind.param_count(spec, 8, 12, bias) == sum(p.numel() for p in layer.parameters())


def test_config_refuses_a_compressed_core_costlier_than_full_attention_unless_asked():
    cheap = {"kind": "compressed", "slots": 2, "chunk": 16, "window": 8}
    costly = {"kind": "compressed", "slots": 4, "chunk": 32, "window": 32}
    base = dict(block_size=128, vocab_size=16, n_layer=1, n_head=2, n_embd=8)
    GPTConfig(**base, approx={"attention": cheap})
    with pytest.raises(ValueError, match=r"approx.attention = compressed\(slots=4,chunk=32,window=32\) "
                                         r"costs 1\.\d\dx .* approx\.attention\.allow_costlier: true"):
        GPTConfig(**base, approx={"attention": costly})
    GPTConfig(**base, approx={"attention": costly | {"allow_costlier": True}})
    with pytest.raises(ValueError, match="kind 'linformer' was renamed 'compressed'"):
        GPTConfig(**base, approx={"attention": {"kind": "linformer", "k": 16, "window": 16, "chunk": 32}})

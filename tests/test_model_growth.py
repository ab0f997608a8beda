"""Growth, freezing and realize on the GPT."""
import pytest
import torch

from model import GPT, BlockApprox, GPTConfig
from model.attention import CompressedCausalAttention, FullCausalAttention
from model.config import AttentionSpec, LinearSpec
from model.linear import FACTORISED

LOWRANK = LinearSpec(kind="lowrank", rank=3)
ABBA = LinearSpec(kind="abba", r1=2, r2=3)
COMPRESSED = AttentionSpec(kind="compressed", slots=2, chunk=4, window=2, allow_costlier=True)


def config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, vocab_size=40, n_layer=4, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**(fields | overrides))


def batch(cfg: GPTConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (3, 12), generator=g)
    return idx, torch.randint(0, cfg.vocab_size, (3, 12), generator=g)


NEW_BLOCKS = [
    BlockApprox(),
    BlockApprox(attn_proj=LOWRANK, mlp_proj=LOWRANK),
    BlockApprox(attn_qkv=ABBA, attn_proj=ABBA, mlp_fc=ABBA, mlp_proj=ABBA),
    BlockApprox(attn_proj=LOWRANK, mlp_proj=ABBA, attention=COMPRESSED),
]


@pytest.mark.parametrize("new_block", NEW_BLOCKS)
def test_add_block_preserves_the_function_bit_for_bit(new_block):
    cfg = config(approx={"mlp_fc": ABBA})
    torch.manual_seed(0)
    model = GPT(cfg, n_initial_layers=2).eval()
    idx, targets = batch(cfg)
    before, _ = model(idx, targets)
    block = model.add_block(new_block)
    after, _ = model(idx, targets)
    assert model.n_blocks == 3 and model.transformer.h[2] is block
    assert model.block_approx(2) == new_block
    assert torch.equal(before, after)


def test_new_block_learns_from_its_first_step():
    cfg = config()
    torch.manual_seed(0)
    model = GPT(cfg, n_initial_layers=1)
    block = model.add_block(BlockApprox(attn_proj=LOWRANK, mlp_proj=ABBA))
    idx, targets = batch(cfg)
    model(idx, targets)[1].backward()
    assert torch.count_nonzero(block.attn.c_proj.b.grad) > 0
    assert torch.count_nonzero(block.mlp.c_proj.b1.grad) > 0
    assert torch.count_nonzero(block.attn.c_proj.a.grad) == 0  # b = 0 on the first step
    assert torch.count_nonzero(block.mlp.c_fc.weight.grad) == 0  # c_proj = 0 blocks the branch...
    assert torch.count_nonzero(block.attn.c_attn.weight.grad) == 0  # ...for one step only


def test_add_block_defaults_to_the_configs_per_layer_settings_and_grows_past_the_target():
    cfg = config(n_layer=2, approx={"layers": {1: {"mlp_fc": LOWRANK}}})
    model = GPT(cfg, n_initial_layers=1)
    model.add_block()
    assert model.block_approx(1).mlp_fc == LOWRANK
    assert model.config.n_layer == 2
    model.add_block()
    assert model.n_blocks == 3 and model.config.n_layer == 3
    assert model.block_approx(2) == BlockApprox()
    with pytest.raises(ValueError, match="rank"):
        model.add_block(BlockApprox(attn_proj=LinearSpec(kind="lowrank", rank=17)))


def test_add_block_follows_the_models_device_and_dtype():
    model = GPT(config(), n_initial_layers=1).double()
    block = model.add_block(NEW_BLOCKS[3])
    assert all(p.dtype == torch.float64 for p in block.parameters())


def _output_of_block(model, i, store):
    return model.transformer.h[i].register_forward_hook(lambda m, inp, out: store.__setitem__(i, out))


def test_frozen_prefix_runs_without_autograd_and_trainable_blocks_still_learn():
    cfg = config(n_layer=3, approx={"attn_qkv": LOWRANK, "attention": COMPRESSED})
    torch.manual_seed(0)
    model = GPT(cfg).train()
    model.freeze_embeddings()
    model.freeze_layer(0)
    model.freeze_layer(1)
    assert model.frozen_layers() == [0, 1]
    outputs, grad_mode = {}, {}
    hooks = [_output_of_block(model, i, outputs) for i in range(3)]
    hooks += [model.transformer.h[i].register_forward_pre_hook(
        lambda m, inp, i=i: grad_mode.__setitem__(i, torch.is_grad_enabled())) for i in range(3)]
    idx, targets = batch(cfg)
    model(idx, targets)[1].backward()
    for hook in hooks:
        hook.remove()
    assert grad_mode == {0: False, 1: False, 2: True}
    assert outputs[1].grad_fn is None and outputs[0].grad_fn is None
    assert outputs[2].grad_fn is not None
    prefix = [*model.transformer.h[0].parameters(), *model.transformer.h[1].parameters(),
              model.transformer.wte.weight, model.transformer.wpe.weight]
    assert all(p.grad is None and not p.requires_grad for p in prefix)
    for name, p in model.transformer.h[2].named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert torch.count_nonzero(model.transformer.ln_f.weight.grad) > 0  # ln_f stays trainable


def test_no_prefix_shortcut_when_the_embeddings_train():
    cfg = config(n_layer=3)
    model = GPT(cfg)
    model.freeze_layer(0)
    model.freeze_layer(2)  # frozen above trainable ones: the gradient must pass through it
    outputs, grad_mode = {}, []
    hooks = [_output_of_block(model, 0, outputs), model.transformer.h[0].register_forward_pre_hook(
        lambda m, inp: grad_mode.append(torch.is_grad_enabled()))]
    idx, targets = batch(cfg)
    model(idx, targets)[1].backward()
    for hook in hooks:
        hook.remove()
    assert grad_mode == [True]
    assert outputs[0].grad_fn is not None  # wte trains, so block 0 must be differentiated through
    assert model.transformer.wte.weight.grad is not None
    assert all(p.grad is None for p in model.transformer.h[2].parameters())
    assert all(p.grad is not None for p in model.transformer.h[1].parameters())


def test_unfreeze_restores_training():
    model = GPT(config(n_layer=2))
    model.freeze_embeddings()
    model.freeze_layer(1)
    assert model.frozen_layers() == [1] and model.embeddings_frozen()
    model.unfreeze_layer(1)
    model.unfreeze_embeddings()
    assert model.frozen_layers() == [] and not model.embeddings_frozen()
    assert all(p.requires_grad for p in model.parameters())


def test_adamw_with_weight_decay_leaves_frozen_tensors_bit_identical():
    cfg = config(n_layer=3, approx={"mlp_fc": ABBA, "attention": COMPRESSED})
    torch.manual_seed(0)
    model = GPT(cfg)
    model.freeze_embeddings()
    model.freeze_layer(0)
    model.freeze_layer(2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    decay, no_decay = model.decay_groups()
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    idx, targets = batch(cfg)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(idx, targets)[1].backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert frozen and all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in trainable.items())


def test_realize_of_factorised_linears_keeps_logits():
    cfg = config(n_layer=3, approx={"attn_qkv": LOWRANK, "attn_proj": ABBA, "mlp_fc": ABBA,
                                    "mlp_proj": LOWRANK, "layers": {1: {"attn_qkv": LinearSpec()}}})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    model.freeze_layer(1)
    idx, targets = batch(cfg)
    before, _ = model(idx, targets)
    model.realize()
    after, _ = model(idx, targets)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, FACTORISED) for m in model.modules())
    assert model.config.approx == GPTConfig().approx
    assert all(model.block_approx(i) == BlockApprox() for i in range(3))
    assert model.frozen_layers() == [1]  # realize keeps trainability per layer

    dense = GPT(config(n_layer=3))
    dense.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(dense.eval()(idx, targets)[0], after)


def test_realize_replaces_compressed_attention_by_full_attention_and_loads_into_a_dense_gpt():
    cfg = config(n_layer=4, approx={"attention": COMPRESSED, "mlp_fc": LOWRANK})
    model = GPT(cfg, n_initial_layers=2)
    assert isinstance(model.transformer.h[0].attn.core, CompressedCausalAttention)
    model.realize()
    assert all(isinstance(b.attn.core, FullCausalAttention) for b in model.transformer.h)
    assert not any("core" in key for key in model.state_dict())
    dense = GPT(config(n_layer=2))  # the realized model's current shape
    dense.load_state_dict(model.state_dict(), strict=True)
    idx, targets = batch(cfg)
    torch.testing.assert_close(dense.eval()(idx, targets)[0], model.eval()(idx, targets)[0])

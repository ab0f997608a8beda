"""The dense GPT is nanoGPT: same keys, same function as an independent reference, GPT-2 init."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.linear import LowRankLinear


def small_config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**(fields | overrides))


def reference_logits(state: dict, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 forward written from scratch over a nanoGPT state dict (explicit mask, no SDPA)."""
    def get(name):
        return state.get(name)

    def layer_norm(x, prefix):
        return F.layer_norm(x, (config.n_embd,), get(prefix + ".weight"), get(prefix + ".bias"), 1e-5)

    def linear(x, prefix):
        out = x @ get(prefix + ".weight").T
        bias = get(prefix + ".bias")
        return out if bias is None else out + bias

    B, T = idx.shape
    H, D = config.n_head, config.n_embd // config.n_head
    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        q, k, v = linear(layer_norm(x, p + ".ln_1"), p + ".attn.c_attn").split(config.n_embd, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, config.n_embd)
        x = x + linear(y, p + ".attn.c_proj")
        h = linear(layer_norm(x, p + ".ln_2"), p + ".mlp.c_fc")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + linear(h, p + ".mlp.c_proj")
    x = layer_norm(x, "transformer.ln_f")
    return x @ state["lm_head.weight"].T


def nanogpt_keys(n_layer: int, bias: bool) -> set[str]:
    params = ("weight", "bias") if bias else ("weight",)
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    keys |= {f"transformer.ln_f.{p}" for p in params}
    for i in range(n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"transformer.h.{i}.{module}.{p}" for p in params}
    return keys


@pytest.mark.parametrize("bias", [True, False])
def test_dense_state_dict_keys_are_nanogpts(bias):
    model = GPT(small_config(n_layer=3, bias=bias))
    assert set(model.state_dict()) == nanogpt_keys(3, bias)
    assert model.transformer.wte.weight is model.lm_head.weight  # tied


@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_an_independent_reference(bias):
    config = small_config(bias=bias)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # nonzero biases and norm params so every term is exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    idx = torch.randint(0, config.vocab_size, (3, 11))
    logits, _ = model(idx, idx)
    expected = reference_logits(model.state_dict(), config, idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_forward_contract_like_nanogpt():
    config = small_config()
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    targets = torch.randint(0, config.vocab_size, (2, 9))
    targets[0, :4] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 9, config.vocab_size)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)

    last, no_loss = model(idx)
    assert no_loss is None and last.shape == (2, 1, config.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    with pytest.raises(ValueError, match="block size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


def test_gpt2_initialisation():
    config = small_config(n_layer=6, n_embd=256, n_head=4, vocab_size=2048, block_size=512)
    torch.manual_seed(0)
    model = GPT(config)
    residual = 0.02 / math.sqrt(2 * 6)
    expected = {"transformer.wte.weight": 0.02, "transformer.wpe.weight": 0.02}
    for i in range(6):
        p = f"transformer.h.{i}"
        expected |= {f"{p}.attn.c_attn.weight": 0.02, f"{p}.mlp.c_fc.weight": 0.02,
                     f"{p}.attn.c_proj.weight": residual, f"{p}.mlp.c_proj.weight": residual}
    state = model.state_dict()
    for name, std in expected.items():
        assert abs(state[name].std().item() / std - 1) < 0.05, name
    for name, tensor in state.items():
        if name.endswith(".bias"):
            assert torch.count_nonzero(tensor) == 0, name
        if ".ln_" in name and name.endswith(".weight"):
            assert torch.all(tensor == 1), name


def test_factorised_sites_use_the_dense_init_std_including_residual_scaling():
    config = small_config(n_layer=6, n_embd=256, n_head=4, approx={
        "attn_proj": {"kind": "lowrank", "rank": 8}, "mlp_proj": {"kind": "abba", "r1": 4, "r2": 4},
        "mlp_fc": {"kind": "lowrank", "rank": 2}})
    torch.manual_seed(0)
    model = GPT(config)
    residual = 0.02 / math.sqrt(2 * 6)
    for block in model.transformer.h:
        assert isinstance(block.attn.c_proj, LowRankLinear)
        for layer, std in ((block.attn.c_proj, residual), (block.mlp.c_proj, residual),
                           (block.mlp.c_fc, 0.02), (block.attn.c_attn, 0.02)):
            assert abs(layer.weight.std().item() / std - 1) < 0.25


def test_initial_layers_build_fewer_blocks_initialised_for_the_target_depth():
    config = small_config(n_layer=8, n_embd=256, n_head=4)
    torch.manual_seed(0)
    model = GPT(config, n_initial_layers=1)
    assert model.n_blocks == 1 and model.config.n_layer == 8
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std / (0.02 / math.sqrt(16)) - 1) < 0.05
    with pytest.raises(ValueError, match="n_initial_layers"):
        GPT(config, n_initial_layers=9)


def test_model_owns_its_config():
    config = small_config()
    model = GPT(config, n_initial_layers=1)
    model.add_block()
    model.add_block()
    assert model.config.n_layer == 3 and config.n_layer == 2


def test_decay_groups_follow_nanogpts_rule_over_trainable_params():
    config = small_config(approx={"attn_qkv": {"kind": "lowrank", "rank": 2},
                                  "mlp_fc": {"kind": "abba", "r1": 2, "r2": 2},
                                  "attention": {"kind": "compressed", "slots": 2, "chunk": 4, "window": 0, "allow_costlier": True}})
    model = GPT(config)
    model.freeze_layer(0)
    decay, no_decay = model.decay_groups()
    by_id = {id(p): name for name, p in model.named_parameters()}
    decay_names = {by_id[id(p)] for p in decay}
    no_decay_names = {by_id[id(p)] for p in no_decay}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable and not decay_names & no_decay_names
    assert {"transformer.h.1.attn.c_attn.a", "transformer.h.1.attn.c_attn.b",
            "transformer.h.1.mlp.c_fc.a1", "transformer.h.1.mlp.c_fc.b2",
            "transformer.wte.weight"} <= decay_names
    # The compressed attention's pooling weight and DualLN norms are excluded, like norms and biases.
    assert {"transformer.h.1.attn.c_attn.bias", "transformer.h.1.ln_1.weight",
            "transformer.h.1.attn.core.w_p", "transformer.h.1.attn.core.ln_k.weight",
            "transformer.ln_f.bias"} <= no_decay_names
    assert not any(name.startswith("transformer.h.0.") for name in trainable)


def test_generate_extends_the_sequence_and_top_k_1_is_greedy():
    config = small_config(block_size=8)
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 3))
    out = model.generate(prompt, max_new_tokens=10, top_k=1)  # runs past block_size: crops context
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt)
    greedy = prompt
    for _ in range(10):
        logits, _ = model(greedy[:, -config.block_size:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_torch_compile_traces_the_approximated_model_as_one_graph_without_recompiling():
    """train.compile relies on this: every approximation on, a frozen prefix under no_grad, the
    ABBA autograd.Function and the compressed core's mask all trace into ONE graph (a graph break would split
    it, a guard on the mask cache would compile it twice), and the compiled model computes the same
    loss and gradients as the eager one. aot_eager runs dynamo and AOT autograd without inductor's
    C++ compiler; the trainer test runs inductor itself."""
    approx = {"attn_qkv": {"kind": "abba", "r1": 2, "r2": 2}, "attn_proj": {"kind": "abba", "r1": 2, "r2": 2},
              "mlp_fc": {"kind": "lowrank", "rank": 4}, "mlp_proj": {"kind": "lowrank", "rank": 4},
              "attention": {"kind": "compressed", "slots": 2, "chunk": 8, "window": 4, "allow_costlier": True}}
    config = GPTConfig.model_validate(small_config(n_layer=3).model_dump() | {"approx": approx})
    torch.manual_seed(0)
    eager = GPT(config)
    eager.freeze_embeddings()
    eager.freeze_layer(0)
    compiled = GPT(config)
    compiled.load_state_dict(eager.state_dict())
    compiled.freeze_embeddings()
    compiled.freeze_layer(0)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled.compile(backend=counting_backend)
    idx, targets = torch.randint(40, (2, 16)), torch.randint(40, (2, 16))
    for _ in range(2):  # the second call must reuse the first call's graph
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            model(idx, targets)[1].backward()
    assert len(graphs) == 1
    torch.testing.assert_close(compiled(idx, targets)[1], eager(idx, targets)[1])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        else:
            assert q.grad is None, name
    torch._dynamo.reset()


def test_parameter_roles_name_every_parameter_by_its_kind():
    from model import ParamRole
    config = small_config(approx={"attn_qkv": {"kind": "lowrank", "rank": 2},
                                  "mlp_fc": {"kind": "abba", "r1": 2, "r2": 2},
                                  "attention": {"kind": "compressed", "slots": 2, "chunk": 4, "window": 0,
                                                "allow_costlier": True}})
    roles = GPT(config).parameter_roles()
    assert set(roles) == {name for name, _ in GPT(config).named_parameters()}
    h = "transformer.h.0."
    assert roles[h + "attn.c_attn.a"] == roles[h + "attn.c_attn.b"] == ParamRole("lowrank", True, True)
    assert roles[h + "mlp.c_fc.b2"] == ParamRole("abba", True, True)
    assert roles[h + "mlp.c_fc.bias"] == ParamRole("abba", False, False)
    assert roles[h + "attn.c_proj.weight"] == ParamRole("dense", False, True)
    assert roles[h + "attn.core.w_p"] == ParamRole("compression", False, False)
    assert roles[h + "attn.core.ln_v.bias"] == roles[h + "ln_2.weight"] == ParamRole("norm", False, False)
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == ParamRole("embedding", False, True)

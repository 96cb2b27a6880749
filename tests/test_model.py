import pytest
import torch
from transformers import GPT2LMHeadModel

from course_lib.model import (
    GPT,
    GPTConfig,
    apply_rope,
    from_gpt2,
    next_token_probs,
    rope_cos_sin,
    to_gpt2,
    to_gpt2_config,
)

SMALL = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(SMALL).eval()


@pytest.fixture
def idx():
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_embd": 30}, "n_embd=30 must be divisible by n_head=4"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive int"),
        ({"n_layer": -1}, "n_layer must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"positions": "sinusoidal"}, "positions must be one of"),
        ({"positions": "rope", "n_embd": 12, "n_head": 4}, "head size n_embd/n_head=3 must be even"),
        ({"rope_base": 1.0}, "rope_base must be > 1"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    args = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32} | changes
    with pytest.raises(ValueError, match=message):
        GPTConfig(**args)


def test_shapes_loss_and_structure(model, idx):
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 12, 50) and out.loss.shape == () and out.past is None
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model.lm_head.weight is model.wte.weight
    attn = model.blocks[0].attn
    assert all(isinstance(getattr(attn, n), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))


def test_untied_model_has_its_own_head():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, tie_weights=False))
    assert model.lm_head.weight is not model.wte.weight
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(
            p.numel() for p in GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8)).parameters()
        )
        + 50 * 8
    )


def test_parameter_count_matches_gpt2_formula():
    L, d, V, T = SMALL.n_layer, SMALL.n_embd, SMALL.vocab_size, SMALL.block_size
    assert sum(p.numel() for p in GPT(SMALL).parameters()) == 12 * L * d * d + 13 * L * d + (V + T) * d + 2 * d


def test_causality_future_tokens_do_not_change_past_logits(model, idx):
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(model(changed).logits[:, :8], model(idx).logits[:, :8])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_gives_the_same_logits(positions, idx):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, positions=positions)).eval()
    full = model(idx).logits
    first = model(idx[:, :7], use_cache=True)
    rest = model(idx[:, 7:], past=first.past, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5, rtol=0)
    assert rest.past[0][0].shape == (2, 4, 12, 8)


def test_attention_weights_on_request_are_causal_distributions(model, idx):
    out = model(idx, return_attention=True)
    torch.testing.assert_close(out.logits, model(idx).logits, atol=1e-5, rtol=0)
    weights = out.attentions[1]
    assert weights.shape == (2, 4, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12))
    assert (weights.triu(1) == 0).all()


def test_rope_matches_transformers_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    positions = torch.arange(6)
    cos, sin = rope_cos_sin(positions, 8)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=16, num_attention_heads=2, max_position_embeddings=16))
    hf_cos, hf_sin = rotary(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(8), torch.randn(8)

    def score(p_q, p_k):
        cos, sin = rope_cos_sin(torch.tensor([p_q, p_k]), 8)
        return apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1])

    torch.testing.assert_close(score(3, 1), score(10, 8))


def test_gpt2_conversion_round_trip_gives_the_same_logits(model, idx):
    hf = to_gpt2(model)
    assert isinstance(hf, GPT2LMHeadModel)
    torch.testing.assert_close(hf(input_ids=idx).logits, model(idx).logits, atol=1e-5, rtol=0)
    back = from_gpt2(hf)
    torch.testing.assert_close(back(idx).logits, model(idx).logits, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())


def test_gpt2_conversion_rejects_what_gpt2_cannot_express():
    with pytest.raises(ValueError, match="positions='learned' and bias=True"):
        to_gpt2_config(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, positions="rope"))
    with pytest.raises(TypeError, match="model must be a course_lib GPT"):
        to_gpt2(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hf_model must be a transformers GPT2LMHeadModel"):
        from_gpt2(torch.nn.Linear(2, 2))


def test_forward_rejects_bad_input(model, idx):
    with pytest.raises(ValueError, match=r"idx must be an integer tensor of shape \(B, T\)"):
        model(idx.float())
    with pytest.raises(ValueError, match="exceed block_size=16: crop the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, targets=idx[:, :3])
    with pytest.raises(ValueError, match="past must hold keys and values for all 2 layers"):
        model(idx, past=model(idx, use_cache=True).past[:1])
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"vocab_size": 5})


def test_generate_with_and_without_cache_agree_even_beyond_the_context(model, idx):
    a = model.generate(idx[:, :4], 30, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = model.generate(idx[:, :4], 30, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert a.shape == (2, 34) and torch.equal(a, b) and torch.equal(a[:, :4], idx[:, :4])
    greedy = model.generate(idx[:, :4], 3, temperature=0)
    assert torch.equal(greedy[:, 4], model(idx[:, :4]).logits[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(idx, -1)


def test_next_token_probs_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(next_token_probs(logits), logits.softmax(-1))
    assert torch.equal(next_token_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0]]))
    top2 = next_token_probs(logits, top_k=2)
    assert (top2[0, 2:] == 0).all() and top2.sum().item() == pytest.approx(1.0)
    p = logits.softmax(-1)[0]
    nucleus = next_token_probs(logits, top_p=float(p[0]) + 1e-4)  # needs the two most likely tokens
    assert (nucleus[0, :2] > 0).all() and (nucleus[0, 2:] == 0).all()
    assert next_token_probs(logits, top_p=0.01)[0, 0] == 1.0  # the most likely token always survives
    hot = next_token_probs(logits, temperature=10.0)
    assert hot.max() < p.max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature must be a number >= 0"),
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_next_token_probs_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        next_token_probs(torch.zeros(1, 4), **kwargs)


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError, match="head_size must be an even int"):
        rope_cos_sin(torch.arange(4), 7)
    with pytest.raises(ValueError, match="positions must be a 1-D tensor"):
        rope_cos_sin(torch.zeros(2, 2), 8)
    cos, sin = rope_cos_sin(torch.arange(4), 8)
    with pytest.raises(ValueError, match="must broadcast with cos and sin"):
        apply_rope(torch.randn(1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="must broadcast with cos and sin"):
        apply_rope(torch.randn(4, 6), cos, sin)
    assert apply_rope(torch.randn(8), cos, sin).shape == (4, 8)  # one vector at every position

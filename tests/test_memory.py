import dataclasses

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.measure import saved_activation_bytes, storage_bytes
from course_lib.memory import (
    RECIPES,
    MemoryBreakdown,
    ModelShape,
    Parallelism,
    activation_bytes,
    activation_elements_per_layer,
    kv_cache_bytes,
    matmul_intensity,
    per_device_memory,
    sharded_state_bytes,
    state_bytes,
    training_flops_per_token,
)
from course_lib.model import GPT, GPTConfig
from course_lib.train import lm_loss

CONFIG = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=8)
GPT2_SMALL = ModelShape("GPT-2 small", n_layer=12, d_model=768, n_head=12, vocab_size=50257, context=1024)
LLAMA2_7B = ModelShape("LLaMA-2 7B", 32, 4096, 32, 32000, 4096, d_ff=11008, mlp="swiglu", tied=False)
LLAMA2_70B = ModelShape("LLaMA-2 70B", 80, 8192, 64, 32000, 4096, n_kv_head=8, d_ff=28672, mlp="swiglu", tied=False)


def test_bytes_per_parameter_of_each_recipe():
    per_param = {name: state_bytes(1, recipe).total for name, recipe in RECIPES.items()}
    assert per_param == {"fp32": 4 + 4 + 8, "mixed": 2 + 2 + 12, "autocast": 4 + 4 + 8}
    assert state_bytes(1, RECIPES["mixed"], "sgd_momentum").as_dict() == {
        "parameters": 2, "gradients": 2, "optimizer": 8, "activations": 0, "kv_cache": 0}  # fmt: skip
    assert state_bytes(10, RECIPES["fp32"], "sgd").total == 80


def test_breakdowns_add_up():
    a, b = MemoryBreakdown(parameters=1, kv_cache=2), MemoryBreakdown(gradients=3, kv_cache=4)
    assert (a + b).as_dict() == {"parameters": 1, "gradients": 3, "optimizer": 0, "activations": 0, "kv_cache": 6}
    assert (a + b).total == 10


def test_parameter_counts_match_real_models():
    assert GPT2_SMALL.n_params == 124_439_808
    shape = ModelShape.from_gpt_config(CONFIG)
    model = GPT(CONFIG)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert storage_bytes(model.parameters()) == 4 * shape.n_params
    tiny = ModelShape("tiny llama", 2, 64, 4, 100, 32, n_kv_head=2, d_ff=176, mlp="swiglu", tied=False)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    assert tiny.n_params == sum(p.numel() for p in llama.parameters())
    assert (LLAMA2_7B.n_params, LLAMA2_70B.n_params) == (6_738_415_616, 68_976_648_192)


def test_activation_formula_equals_the_bytes_autograd_saves():
    model, shape = GPT(CONFIG), ModelShape.from_gpt_config(CONFIG)
    b, t, d, v = 3, 16, 8, 65
    x, y = torch.randint(v, (b, t)), torch.randint(v, (b, t))
    head = 4 * (2 * b * t * d + 2 * b * t + b * t * v) + 8 * (2 * b * t + t) + 4  # ln_f, log-softmax, int64 ids, total
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        _, saved = saved_activation_bytes(lambda: lm_loss(model, x, y), exclude=model.parameters())
        assert saved == activation_bytes(shape, b, t, 4, checkpointing) + head
    assert activation_elements_per_layer(shape, b, t) == b * t * (16 * d + 4) + b * 2 * t
    assert activation_elements_per_layer(shape, b, t, "explicit") == b * t * (16 * d + 4) + b * 2 * t * t


def test_kv_cache_formula_equals_the_cache_the_model_keeps():
    model, shape = GPT(CONFIG), ModelShape.from_gpt_config(CONFIG)
    past = model(torch.randint(65, (3, 10)), use_cache=True).past
    assert storage_bytes([t for layer in past for t in layer]) == kv_cache_bytes(shape, 3, 10, bytes_per_element=4)
    # GQA: 8 of 64 heads keep keys and values; 2 bytes each, 4096 tokens, one sequence
    assert kv_cache_bytes(LLAMA2_70B, 1, 4096) == 2 * 80 * 8 * 128 * 4096 * 2


def test_training_flops_equal_the_counted_matmuls():
    model, shape = GPT(CONFIG), ModelShape.from_gpt_config(CONFIG)
    b, t = 3, 16
    x, y = torch.randint(65, (b, t)), torch.randint(65, (b, t))
    with FlopCounterMode(display=False) as counter:  # the explicit attention path: every matmul is visible
        logits = model(x, return_attention=True).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    assert counter.get_total_flops() == b * t * training_flops_per_token(shape, t)
    model.gradient_checkpointing = True
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):  # recompute whole blocks
        lm_loss(model, x, y).backward()
    assert counter.get_total_flops() == b * t * (
        training_flops_per_token(shape, t, checkpointing=True) - 16 * shape.n_layer * t * shape.d_model
    )  # SDPA counts 0 on CPU
    assert shape.matmul_params == 12 * 2 * 8**2 + 65 * 8


def test_matmul_intensity_by_hand():
    assert matmul_intensity(2, 2, 2, 2) == 2 * 8 / (12 * 2)
    assert matmul_intensity(1, 4096, 4096) < 1 < matmul_intensity(4096, 4096, 4096)


def test_zero_stages_reproduce_the_zero_papers_table_1():
    # Rajbhandari et al. 2019, Table 1: 7.5B parameters, 64 data-parallel GPUs, mixed precision Adam (K = 12)
    gb = [sharded_state_bytes(7.5e9, RECIPES["mixed"], dp=64, zero_stage=s).total / 1e9 for s in range(4)]
    assert [round(g, 2) for g in gb] == [120.0, 31.41, 16.64, 1.88]


def test_per_device_memory_shards_what_each_stage_shards():
    shape = ModelShape.from_gpt_config(CONFIG)
    n, recipe = shape.n_params, RECIPES["mixed"]
    for stage, expected in ((0, (2, 2, 12)), (1, (2, 2, 3)), (2, (2, 0.5, 3)), (3, (0.5, 0.5, 3))):
        m = per_device_memory(shape, 1, 16, recipe, parallel=Parallelism(dp=4, zero_stage=stage))
        assert (m.parameters / n, m.gradients / n, m.optimizer / n) == pytest.approx(expected)
    split = per_device_memory(shape, 2, 16, recipe, parallel=Parallelism(tp=2, pp=2))
    assert split.parameters == n * 2 / 4 and split.optimizer == n * 12 / 4
    assert split.activations == activation_bytes(shape, 2, 16, 2) / 2
    served = per_device_memory(shape, 4, 16, recipe, inference=True)
    assert served.as_dict() == {"parameters": 2 * n, "gradients": 0, "optimizer": 0, "activations": 0,
                                "kv_cache": kv_cache_bytes(shape, 4, 16, 2)}  # fmt: skip


def test_without_sequence_parallelism_the_layernorm_activations_stay_whole():
    # chapter 08's count for LLaMA-2 7B, T = 4096, tp = 8: (4d + 4)·T per layer on every rank, the rest split
    tp, t = 8, 4096
    with_sp = per_device_memory(LLAMA2_7B, 1, t, parallel=Parallelism(tp=tp)).activations
    without_sp = per_device_memory(LLAMA2_7B, 1, t, parallel=Parallelism(tp=tp), sequence_parallel=False).activations
    replicated = LLAMA2_7B.n_layer * (4 * LLAMA2_7B.d_model + 4) * t * 2
    assert with_sp == activation_bytes(LLAMA2_7B, 1, t, 2) / tp
    assert without_sp == replicated + (activation_bytes(LLAMA2_7B, 1, t, 2) - replicated) / tp
    assert round(without_sp / with_sp, 1) == 2.5  # as chapter 08 prints
    # checkpointing keeps the block inputs only: without sequence parallelism every rank keeps all of them
    kept = per_device_memory(LLAMA2_7B, 1, t, checkpointing=True, parallel=Parallelism(tp=tp), sequence_parallel=False)
    assert kept.activations == activation_bytes(LLAMA2_7B, 1, t, 2, checkpointing=True)
    assert per_device_memory(LLAMA2_7B, 1, t, sequence_parallel=False) == per_device_memory(LLAMA2_7B, 1, t)  # tp 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ModelShape("x", 2, 10, 3, 10, 10), "d_model=10 must be divisible by n_head=3"),
        (lambda: ModelShape("x", 2, 8, 4, 10, 10, n_kv_head=3), "n_kv_head must divide n_head=4"),
        (lambda: ModelShape("x", 0, 8, 4, 10, 10), "n_layer must be a positive int"),
        (lambda: ModelShape("x", 2, 8, 4, 10, 10, mlp="relu"), "mlp must be 'gelu' or 'swiglu'"),
        (lambda: Parallelism(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
        (lambda: Parallelism(dp=0), "dp must be a positive int"),
        (lambda: sharded_state_bytes(10, RECIPES["mixed"], dp=2, zero_stage=5), "zero_stage must be 0, 1, 2 or 3"),
        (lambda: RECIPES["fp32"].optimizer_bytes("lion"), "optimizer must be one of"),
        (lambda: per_device_memory(GPT2_SMALL, 1, 2048), "seq=2048 exceeds the model's context=1024"),
        (lambda: per_device_memory(GPT2_SMALL, 1, 8, parallel=Parallelism(tp=5)), "tp=5 must divide n_head=12"),
        (lambda: per_device_memory(GPT2_SMALL, 1, 8, parallel=Parallelism(pp=13)), "pp=13 must be at most n_layer"),
        (lambda: activation_elements_per_layer(GPT2_SMALL, 1, 8, "flash"), "attention must be 'fused' or 'explicit'"),
        (lambda: kv_cache_bytes(GPT2_SMALL, 0, 8), "batch must be a positive int"),
        (lambda: matmul_intensity(1, 0, 1), "k must be a positive int"),
        (lambda: ModelShape.from_gpt_config(dataclasses.replace(CONFIG, bias=False)), "GPT-2-style"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_shape_must_be_a_model_shape():
    with pytest.raises(TypeError, match="shape must be a ModelShape"):
        per_device_memory(CONFIG, 1, 8)

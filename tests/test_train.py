import dataclasses
import math

import pytest
import torch

from course_lib.data import random_batches
from course_lib.model import GPT, GPTConfig, to_gpt2
from course_lib.recipes import CHAPTER05
from course_lib.train import (
    History,
    PlainStepper,
    TrainConfig,
    autocast,
    evaluate,
    lm_loss,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
    train,
)

TOKENS = torch.tensor(([0, 1, 2, 3, 4, 5, 6, 7] * 200), dtype=torch.uint8)  # a pattern a GPT learns quickly


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"steps": 10, "lr": 0}, "lr must be a positive finite number"),
        ({"steps": 10, "min_lr": 0.1}, r"min_lr must be in \[0, lr="),
        ({"steps": 10, "warmup_steps": 11}, r"warmup_steps must be an int in \[0, steps=10\]"),
        ({"steps": 10, "weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"steps": 10, "betas": (0.9, 1.0)}, "betas must be two numbers"),
        ({"steps": 10, "grad_clip": -1.0}, "grad_clip must be a positive number or None"),
        ({"steps": 10, "eval_every": -1}, "eval_every must be an int >= 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    config = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, config) == pytest.approx(1.0) and lr_at(109, config) == pytest.approx(0.1)
    assert lr_at(60, config) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    lrs = [lr_at(s, config) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    with pytest.raises(ValueError, match=r"step must be an int in \[0, steps=110\)"):
        lr_at(110, config)


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    groups = make_optimizer(model, TrainConfig(steps=1, weight_decay=0.3)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.3 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.dim() == 2}
    assert all(p.dim() == 1 for g in groups if g["weight_decay"] == 0.0 for p in g["params"])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        make_optimizer(frozen, TrainConfig(steps=1))


def test_training_lowers_the_loss_and_records_history():
    model = tiny_model()
    batches = random_batches(TOKENS, 8, 8, seed=0)
    evals = [next(random_batches(TOKENS, 8, 8, seed=9))]
    before = evaluate(model, evals)
    config = TrainConfig(steps=60, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_every=20)
    history = train(model, batches, config, eval_batches=evals, progress=False)
    assert isinstance(history, History) and history.step == list(range(60))
    assert history.eval_step == [20, 40, 60] and history.eval_loss[-1] < 0.25 * before
    assert len(history.lr) == len(history.grad_norm) == len(history.tokens_per_s) == 60
    assert history.lr[0] == pytest.approx(2e-3) and history.lr[-1] == pytest.approx(1e-3)
    assert model.training


def test_clipping_bounds_the_update_norm():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stepper = PlainStepper(model, optimizer, grad_clip=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(random_batches(TOKENS, 4, 8))
    stepper.backward(lm_loss(model, x, y))
    norm = stepper.step()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert norm > 1e-3 and moved.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_a_custom_stepper_replaces_backward_and_step():
    calls = []

    class Recording(PlainStepper):
        def backward(self, loss):
            calls.append("backward")
            super().backward(loss)

        def step(self):
            calls.append("step")
            return super().step()

    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(steps=2))
    train(model, random_batches(TOKENS, 4, 8), TrainConfig(steps=2), optimizer=optimizer,
          stepper=Recording(model, optimizer, 1.0), progress=False)  # fmt: skip
    assert calls == ["backward", "step", "backward", "step"]


def test_the_same_loop_trains_transformers_gpt2_to_the_same_losses():
    ours = tiny_model()
    hf = to_gpt2(tiny_model()).train()
    batches = [next(random_batches(TOKENS, 4, 8, seed=s)) for s in range(5)]
    config = TrainConfig(steps=5, lr=1e-2, min_lr=1e-3)
    history_ours = train(ours, iter(batches), config, progress=False)
    history_hf = train(hf, iter(batches), config, progress=False)
    assert history_ours.loss == pytest.approx(history_hf.loss, abs=1e-4)


def test_train_rejects_bad_arguments():
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(tiny_model(), random_batches(TOKENS, 2, 8), {"steps": 1})
    with pytest.raises(TypeError, match="batches must be an iterator"):
        train(tiny_model(), [(TOKENS[:8], TOKENS[1:9])], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="batches must not be empty"):
        evaluate(tiny_model(), [])


def test_a_diverging_run_stops_with_advice():
    model = tiny_model()
    with torch.no_grad():
        model.wte.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="lower lr or enable grad_clip"):
        train(model, random_batches(TOKENS, 2, 8), TrainConfig(steps=1), progress=False)


def test_chapter05_recipe_is_a_valid_configuration():
    config = CHAPTER05.train_config()
    assert config.steps == CHAPTER05.steps and config.warmup_steps == CHAPTER05.warmup_steps
    assert CHAPTER05.train_config(10).warmup_steps == 10  # warmup never longer than a short run
    assert CHAPTER05.model_config(vocab_size=85).block_size == CHAPTER05.block_size


def accumulation_runs(k: int, micro_size: int, steps: int = 3, scale_by_k: bool = True):
    """Train twice from the same weights: one batch of k * micro_size windows per step, and k micro-batches."""
    windows = [next(random_batches(TOKENS, k * micro_size, 8, seed=s)) for s in range(steps)]
    micro = [(x[i * micro_size : (i + 1) * micro_size], y[i * micro_size : (i + 1) * micro_size])
             for x, y in windows for i in range(k)]  # fmt: skip
    # SGD, not AdamW: Adam divides each update by the gradient's running scale, so it would hide a wrong 1/k
    # and turn the float noise of gradients that are exactly 0 in theory (the key bias) into full-size steps.
    config = TrainConfig(steps=steps, lr=0.5, min_lr=0.1, grad_clip=None)
    big, accumulated = tiny_model(), tiny_model()
    train(big, iter(windows), config, optimizer=torch.optim.SGD(big.parameters()), progress=False)
    loss_fn = lm_loss if scale_by_k else (lambda m, x, y: k * lm_loss(m, x, y))
    train(accumulated, iter(micro), dataclasses.replace(config, accumulation_steps=k), loss_fn=loss_fn,
          optimizer=torch.optim.SGD(accumulated.parameters()), progress=False)  # fmt: skip
    return big, accumulated


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    big, accumulated = accumulation_runs(k=4, micro_size=2)
    for (name, p), q in zip(big.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)


def test_summing_without_the_one_over_k_does_not():
    big, summed = accumulation_runs(k=4, micro_size=2, scale_by_k=False)
    assert max((p - q).abs().max().item() for p, q in zip(big.parameters(), summed.parameters(), strict=True)) > 1e-4


def test_uneven_micro_batches_are_averaged_per_target():
    x, y = next(random_batches(TOKENS, 4, 8, seed=1))
    y = y.clone()
    y[0, :6] = -100  # the first micro-batch has fewer targets than the second
    whole, parts = tiny_model(), tiny_model()
    lm_loss(whole, x, y).backward()
    config = TrainConfig(steps=1, accumulation_steps=2)
    stepper = PlainStepper(parts, torch.optim.SGD(parts.parameters(), lr=0.0), grad_clip=None)
    stepper.step = lambda: 0.0  # keep the accumulated gradients to compare them
    train(parts, iter([(x[:1], y[:1]), (x[1:], y[1:])]), config, stepper=stepper, progress=False)
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(precision):
    batches = [next(random_batches(TOKENS, 8, 8, seed=s)) for s in range(20)]
    config = TrainConfig(steps=20, lr=1e-2, min_lr=1e-3)
    fp32 = train(tiny_model(), iter(batches), config, progress=False)
    low = train(tiny_model(), iter(batches), dataclasses.replace(config, precision=precision), progress=False)
    assert abs(low.loss[-1] - fp32.loss[-1]) < 0.1 and low.loss[-1] < low.loss[0]


def test_fp16_uses_a_grad_scaler_and_refuses_to_run_without_one():
    seen = []

    class Spy(PlainStepper):
        def step(self):
            seen.append(self.scaler)
            return super().step()

    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(steps=1))
    scaler = torch.amp.GradScaler("cpu")
    train(model, random_batches(TOKENS, 2, 8), TrainConfig(steps=1, precision="fp16"), optimizer=optimizer,
          stepper=Spy(model, optimizer, 1.0, scaler), progress=False)  # fmt: skip
    assert seen == [scaler] and scaler.get_scale() > 1
    with pytest.raises(ValueError, match="needs loss_scaling=True"):
        TrainConfig(steps=1, precision="fp16", loss_scaling=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulation_steps": 0}, "accumulation_steps must be an int >= 1"),
        ({"precision": "fp8"}, "precision must be one of"),
    ],
)
def test_new_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=1, **kwargs)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("int8", "cpu")


def test_a_step_without_targets_is_an_error():
    x, y = next(random_batches(TOKENS, 2, 8))
    with pytest.raises(ValueError, match="no targets"):
        train(tiny_model(), iter([(x, torch.full_like(y, -100))]), TrainConfig(steps=1), progress=False)


def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    x, y = next(random_batches(TOKENS, 4, 8, seed=2))

    def saved_bytes_and_grads(checkpointing: bool):
        model = tiny_model()
        model.gradient_checkpointing = checkpointing
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(model, x, y)
        loss.backward()
        return sum(saved), [p.grad for p in model.parameters()]

    full_bytes, full_grads = saved_bytes_and_grads(False)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(True)
    assert ckpt_bytes < full_bytes
    for a, b in zip(full_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_an_interrupted_run_resumes_exactly(tmp_path):
    config = TrainConfig(steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=2)
    uninterrupted = tiny_model()
    full = train(uninterrupted, random_batches(TOKENS, 4, 8, seed=5), config, progress=False)

    first = tiny_model()
    optimizer, batches = make_optimizer(first, config), random_batches(TOKENS, 4, 8, seed=5)
    before = train(first, batches, config, optimizer=optimizer, stop_after=4, progress=False)
    save_checkpoint(tmp_path / "run.pt", first, optimizer, next_step=4, batches=batches)

    resumed = tiny_model(seed=99)  # fresh objects, different weights: everything must come from the checkpoint
    optimizer, batches = make_optimizer(resumed, config), random_batches(TOKENS, 4, 8, seed=123)
    start = load_checkpoint(tmp_path / "run.pt", resumed, optimizer, batches=batches)
    after = train(resumed, batches, config, optimizer=optimizer, start_step=start, progress=False)
    assert before.step + after.step == full.step
    assert before.loss + after.loss == full.loss and before.lr + after.lr == full.lr
    for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_run_with_dropout_resumes_exactly_only_with_its_random_generator_restored(tmp_path):
    config = TrainConfig(steps=8, lr=1e-2, min_lr=1e-3)
    dropout = GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.2)

    def fresh(seed):
        torch.manual_seed(seed)
        model = GPT(dropout)
        return model, make_optimizer(model, config), random_batches(TOKENS, 4, 8, seed=seed)

    model, optimizer, batches = fresh(0)
    full = train(model, batches, config, optimizer=optimizer, progress=False)
    model, optimizer, batches = fresh(0)
    train(model, batches, config, optimizer=optimizer, stop_after=4, progress=False)
    save_checkpoint(tmp_path / "run.pt", model, optimizer, next_step=4, batches=batches)

    model, optimizer, batches = fresh(1)
    start = load_checkpoint(tmp_path / "run.pt", model, optimizer, batches=batches)
    assert train(model, batches, config, optimizer=optimizer, start_step=start, progress=False).loss == full.loss[4:]

    model, optimizer, batches = fresh(1)
    load_checkpoint(tmp_path / "run.pt", model, optimizer, batches=batches)
    torch.manual_seed(1)  # what a load_checkpoint that forgot the random generators would leave
    assert train(model, batches, config, optimizer=optimizer, start_step=start, progress=False).loss != full.loss[4:]


def test_the_cuda_generators_are_saved_and_restored_when_cuda_is_present(tmp_path, monkeypatch):
    saved = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    model = tiny_model()
    optimizer = make_optimizer(model, TrainConfig(steps=1))
    save_checkpoint(tmp_path / "c.pt", model, optimizer, next_step=0)
    load_checkpoint(tmp_path / "c.pt", model, optimizer)
    assert set(restored) == {0, 1}
    assert all(torch.equal(restored[device], state) for device, state in enumerate(saved))


def test_resume_arguments_are_checked(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, steps=2\)"):
        train(model, random_batches(TOKENS, 2, 8), TrainConfig(steps=2), start_step=2, progress=False)
    with pytest.raises(ValueError, match="stop_after must be a positive int"):
        train(model, random_batches(TOKENS, 2, 8), TrainConfig(steps=2), stop_after=0, progress=False)
    optimizer = make_optimizer(model, TrainConfig(steps=1))
    save_checkpoint(tmp_path / "c.pt", model, optimizer, next_step=1, batches=random_batches(TOKENS, 2, 8))
    with pytest.raises(ValueError, match="pass the batches"):
        load_checkpoint(tmp_path / "c.pt", model, optimizer)
    with pytest.raises(ValueError, match="state must come from RandomBatches"):
        random_batches(TOKENS, 2, 8).load_state_dict({"position": 3})


def test_the_loss_keeps_float64_and_promotes_low_precision_logits():
    x, y = next(random_batches(TOKENS, 2, 8, seed=3))
    assert lm_loss(tiny_model().double(), x, y).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lm_loss(tiny_model(), x, y).dtype == torch.float32

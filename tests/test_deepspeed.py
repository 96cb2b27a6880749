"""DeepSpeed's engine under ZeRO-2 and ZeRO-3 on 2 real CPU processes trains the chapter-09 GPT to the weights of
one process; its checkpoint consolidates with zero_to_fp32 into the same weights; gradients summed over the ranks
instead of averaged are caught with SGD and slip through with AdamW."""

import pytest
import torch

from course_lib.launch import launch
from course_lib.parallel import ddp, deepspeed_train

STEPS = ["--steps", "4"]
BUCKETS = ["--bucket-elements", "1000000"]  # DeepSpeed's default 5e8-element buckets cost seconds of page faults
# float32 (DeepSpeed reduces no float64 gradients): the ranks add in another order than one process, and Adam
# turns that rounding into differences of about 1e-6 (chapter 07)
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    model, _ = ddp.single_process_run(ddp.parser().parse_args(STEPS))
    return {name: p.detach() for name, p in model.named_parameters()}


def largest_gap(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max((weights[name].float() - expected).abs().max().item() for name, expected in reference.items())


@pytest.mark.parametrize("stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_zero_stage_on_two_ranks_trains_like_one_process(stage, launcher, reference, tmp_path):
    args = [*STEPS, *BUCKETS, "--zero-stage", stage, "--save-checkpoint"]
    results = launch("course_lib.parallel.deepspeed_train", args,
                     nproc=2, launcher=launcher, result_dir=tmp_path, timeout=300, show_output=False)  # fmt: skip
    weights = deepspeed_train.consolidate(results[0]["checkpoint"])
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name].float(), expected, atol=ATOL, rtol=0)
    params = [r["held_bytes"]["parameters"] for r in results]
    total = 4 * sum(p.numel() for p in reference.values())
    assert params == ([total // 2] * 2 if stage == 3 else [total] * 2)  # ZeRO-3 shards the parameters


def test_ranks_reading_the_same_shard_train_differently(reference, tmp_path):
    results = launch("course_lib.parallel.deepspeed_train", [*STEPS, *BUCKETS, "--zero-stage", 2, "--save-checkpoint",
                     "--same-shard"], nproc=2, launcher="deepspeed", result_dir=tmp_path, timeout=300,
                     show_output=False)  # fmt: skip
    weights = deepspeed_train.consolidate(results[0]["checkpoint"])
    assert not torch.allclose(weights["blocks.0.mlp.fc.weight"].float(), reference["blocks.0.mlp.fc.weight"], atol=ATOL)


def test_accumulating_micro_batches_under_deepspeed_trains_like_one_process(reference, tmp_path):
    args = [*STEPS, "--batch", 8, *BUCKETS, "--zero-stage", 1, "--accumulation", 2, "--save-checkpoint"]  # global 8
    results = launch("course_lib.parallel.deepspeed_train", args, nproc=2, result_dir=tmp_path, timeout=300,
                     show_output=False)  # fmt: skip
    weights = deepspeed_train.consolidate(results[0]["checkpoint"])
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name].float(), expected, atol=ATOL, rtol=0)


def test_summed_gradients_slip_through_adamw_and_are_caught_by_sgd(reference, tmp_path):
    args = [*STEPS, *BUCKETS, "--zero-stage", 2, "--controls"]
    results = launch("course_lib.parallel.deepspeed_train", args, nproc=2, launcher="deepspeed", result_dir=tmp_path,
                     timeout=300, show_output=False)  # fmt: skip
    runs = {(run["optimizer"], run["sum_gradients"], run["clip"]): run for run in results[0]["runs"]}
    assert set(runs) == {("adamw", True, True), *((o, s, False) for o in ("adamw", "sgd") for s in (False, True))}
    weights = {key: torch.load(run["weights"]) for key, run in runs.items()}
    sgd_model, _ = ddp.single_process_run(deepspeed_train.parser().parse_args(STEPS), "sgd")
    sgd_reference = {name: p.detach() for name, p in sgd_model.named_parameters()}
    # AdamW clipped at 1: every norm is above 1, so both runs step with the same clipped gradient
    assert largest_gap(weights[("adamw", True, True)], reference) < ATOL
    # unclipped: the summed gradients are twice the averaged ones, yet the weights differ far less than under SGD
    summed, averaged = runs[("adamw", True, False)]["grad_norm"], runs[("adamw", False, False)]["grad_norm"]
    assert summed == pytest.approx([2 * norm for norm in averaged], rel=1e-3)
    adamw_gap = largest_gap(weights[("adamw", True, False)], weights[("adamw", False, False)])
    assert largest_gap(weights[("sgd", False, False)], sgd_reference) < 1e-6
    assert largest_gap(weights[("sgd", True, False)], sgd_reference) > 10 * adamw_gap

"""DeepSpeed's engine under ZeRO-2 and ZeRO-3 on 2 real CPU processes trains the chapter-09 GPT to the weights of
one process; its checkpoint consolidates with zero_to_fp32 into the same weights."""

import pytest
import torch

from course_lib.launch import launch
from course_lib.parallel import ddp

STEPS = ["--steps", "4"]
BUCKETS = ["--bucket-elements", "1000000"]  # DeepSpeed's default 5e8-element buckets cost seconds of page faults
# float32 (DeepSpeed reduces no float64 gradients): the ranks add in another order than one process, and Adam
# turns that rounding into differences of about 1e-6 (chapter 07)
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    model, _ = ddp.single_process_run(ddp.parser().parse_args(STEPS))
    return {name: p.detach() for name, p in model.named_parameters()}


def consolidated(checkpoint: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="final")


@pytest.mark.parametrize("stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_zero_stage_on_two_ranks_trains_like_one_process(stage, launcher, reference, tmp_path):
    args = [*STEPS, *BUCKETS, "--zero-stage", stage, "--save-checkpoint"]
    results = launch("course_lib.parallel.deepspeed_train", args,
                     nproc=2, launcher=launcher, result_dir=tmp_path, timeout=300, show_output=False)  # fmt: skip
    weights = consolidated(results[0]["checkpoint"])
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name].float(), expected, atol=ATOL, rtol=0)
    params = [r["held_bytes"]["parameters"] for r in results]
    total = 4 * sum(p.numel() for p in reference.values())
    assert params == ([total // 2] * 2 if stage == 3 else [total] * 2)  # ZeRO-3 shards the parameters


def test_ranks_reading_the_same_shard_train_differently(reference, tmp_path):
    results = launch("course_lib.parallel.deepspeed_train", [*STEPS, *BUCKETS, "--zero-stage", 2, "--save-checkpoint",
                     "--same-shard"], nproc=2, launcher="deepspeed", result_dir=tmp_path, timeout=300,
                     show_output=False)  # fmt: skip
    weights = consolidated(results[0]["checkpoint"])
    assert not torch.allclose(weights["blocks.0.mlp.fc.weight"].float(), reference["blocks.0.mlp.fc.weight"], atol=ATOL)


def test_accumulating_micro_batches_under_deepspeed_trains_like_one_process(reference, tmp_path):
    args = [*STEPS, *BUCKETS, "--zero-stage", 1, "--accumulation", 2, "--save-checkpoint"]
    results = launch("course_lib.parallel.deepspeed_train", args, nproc=2, result_dir=tmp_path, timeout=300,
                     show_output=False)  # fmt: skip
    weights = consolidated(results[0]["checkpoint"])
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name].float(), expected, atol=ATOL, rtol=0)

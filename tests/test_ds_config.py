import pytest

from course_lib.ds_config import DeepSpeedSettings, build, validate


def test_the_global_batch_is_micro_batch_times_accumulation_times_ranks():
    config = build(DeepSpeedSettings(micro_batch=4, accumulation=3, world_size=2, zero_stage=2, precision="bf16"))
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"] == {"stage": 2} and config["bf16"] == {"enabled": True}
    assert config["optimizer"]["params"]["torch_adam"] is True  # no compiled optimizer kernel
    assert "fp16" not in config


def test_offload_and_fp16_settings_land_in_their_fields():
    config = build(DeepSpeedSettings(micro_batch=1, zero_stage=3, precision="fp16", offload_optimizer="cpu",
                                     offload_param="nvme", nvme_path="/tmp/swap", grad_clip=None))  # fmt: skip
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/tmp/swap"}
    assert config["fp16"]["loss_scale"] == 0 and "gradient_clipping" not in config


CPU = {"device": "cpu"}


def valid() -> dict:
    return build(DeepSpeedSettings(micro_batch=2, accumulation=2, world_size=2, zero_stage=1))


@pytest.mark.parametrize(
    "change, world, message",
    [
        ({"train_batch_size": 6}, 2, r"train_batch_size=6 must equal .* = 2 × 2 × 2 = 8"),
        ({}, 3, r"= 2 × 2 × 3 = 12"),
        ({"gradient_accumulation_steps": 0}, 2, "gradient_accumulation_steps must be a positive int"),
        ({"zero_optimization": {"stage": 4}}, 2, "zero_optimization.stage must be 0, 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": CPU}}, 2, "offload_param needs ZeRO stage >= 3"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": CPU}}, 2, "offload_optimizer needs ZeRO stage >= 1"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}}, 2, "must be 'cpu' or 'nvme'"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, 2, "needs an nvme_path"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, 2, "fp16 and bf16 are both enabled"),
        ({"gradient_clipping": -1.0}, 2, "gradient_clipping must be a number >= 0"),
        ({}, 0, "world_size must be a positive int"),
    ],
)  # fmt: skip
def test_inconsistent_configs_are_refused_naming_the_field(change, world, message):
    with pytest.raises(ValueError, match=message):
        validate(valid() | change, world)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"offload_optimizer": "disk"}, "offload_optimizer must be one of"),
        ({"micro_batch": 0}, "train_micro_batch_size_per_gpu must be a positive int"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer needs ZeRO stage >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(DeepSpeedSettings(**({"micro_batch": 1} | kwargs)))

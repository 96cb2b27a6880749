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
    assert config["fp16"]["loss_scale"] == 0 and config["gradient_clipping"] == 0.0


def test_no_clipping_is_written_out_because_deepspeed_clips_at_one_when_the_field_is_absent():
    from deepspeed.runtime.config import DeepSpeedConfig

    unclipped = build(DeepSpeedSettings(micro_batch=1, grad_clip=None))
    assert DeepSpeedConfig(unclipped).gradient_clipping == 0.0
    assert DeepSpeedConfig({k: v for k, v in unclipped.items() if k != "gradient_clipping"}).gradient_clipping == 1.0


def test_sgd_is_torch_sgd_and_zero_is_told_it_may_run_it():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = build(DeepSpeedSettings(micro_batch=1, zero_stage=2, optimizer="sgd", lr=0.1, weight_decay=0.0))
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.0}}
    parsed = DeepSpeedConfig(config)
    assert parsed.optimizer_name == "SGD" and parsed.zero_allow_untested_optimizer
    assert "zero_allow_untested_optimizer" not in build(DeepSpeedSettings(micro_batch=1, optimizer="sgd"))  # stage 0


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
        ({"scheduler": {"type": "Cosine"}}, 2, "scheduler.type must be one of"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {}}}, 2, "total_num_steps must be a positive int"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 1}}}, 2,
         r"warmup_num_steps must be an int in \[2, total_num_steps=10\], got 1"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}}, 2, "got 1000"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2,
                                                            "cos_min_ratio": 2.0}}}, 2, "cos_min_ratio must be in"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2,
                                                            "warmup_type": "cubic"}}}, 2, "'log' or 'linear'"),
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
        ({"optimizer": "adam"}, r"optimizer must be one of \('adamw', 'sgd'\)"),
        ({"offload_optimizer": "disk"}, "offload_optimizer must be one of"),
        ({"micro_batch": 0}, "train_micro_batch_size_per_gpu must be a positive int"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer needs ZeRO stage >= 1"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"schedule": "warmup_cosine"}, "needs total_steps"),
        ({"min_lr": 1.0, "lr": 0.1}, r"min_lr must be in \[0, lr=0.1\]"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(DeepSpeedSettings(**({"micro_batch": 1} | kwargs)))


def test_the_deepspeed_schedule_is_handed_over_and_lags_the_loops_by_two_steps():
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from course_lib.train import TrainConfig, lr_at

    settings = DeepSpeedSettings(micro_batch=1, lr=1e-2, min_lr=1e-3, schedule="warmup_cosine", warmup_steps=4,
                                 total_steps=20)  # fmt: skip
    scheduler = build(settings)["scheduler"]
    assert scheduler["type"] == "WarmupCosineLR" and "scheduler" not in build(DeepSpeedSettings(micro_batch=1))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.lr)
    schedule = WarmupCosineLR(optimizer, **scheduler["params"])
    deepspeed_lrs = []
    for _ in range(20):  # as the engine drives it: built before the first step, stepped after every optimizer step
        deepspeed_lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    ours = [lr_at(step, TrainConfig(steps=20, lr=1e-2, min_lr=1e-3, warmup_steps=4)) for step in range(20)]
    assert deepspeed_lrs[:2] == [0.0, 0.0]  # DeepSpeed's first two steps do not move the weights
    assert deepspeed_lrs[2:5] == pytest.approx(ours[0:3])  # its warmup is the loop's, two steps late
    assert max(ours) == pytest.approx(settings.lr) and max(deepspeed_lrs) < settings.lr  # it never reaches the peak
    assert schedule.get_lr()[0] == pytest.approx(settings.min_lr)  # at total_num_steps: min_lr, as the loop's end


def deepspeed_optimizer_choice(config: dict) -> type:
    """The optimizer class DeepSpeed's engine would build for `config` (its own selection code, no engine)."""
    from types import SimpleNamespace

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    engine = SimpleNamespace(_config=DeepSpeedConfig(config), zenflow=False)
    engine.zero_use_cpu_optimizer = lambda: DeepSpeedEngine.zero_use_cpu_optimizer(engine)
    engine.bf16_optimizer_states = lambda: DeepSpeedEngine.bf16_optimizer_states(engine)
    params = dict(config["optimizer"]["params"])
    return DeepSpeedEngine.get_optimizer_configuration(engine, params, adam_w_mode=True)[0]


def test_an_offloaded_optimizer_is_deepspeeds_cpu_adam_and_otherwise_torchs_adamw():
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    settings = DeepSpeedSettings(micro_batch=1, world_size=1, zero_stage=2)
    assert deepspeed_optimizer_choice(build(settings)) is torch.optim.AdamW
    offloaded = build(DeepSpeedSettings(micro_batch=1, world_size=1, zero_stage=2, offload_optimizer="cpu"))
    assert "torch_adam" not in offloaded["optimizer"]["params"]
    assert deepspeed_optimizer_choice(offloaded) is DeepSpeedCPUAdam

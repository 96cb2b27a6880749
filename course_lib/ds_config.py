"""DeepSpeed configurations, built from a few named settings and checked before DeepSpeed sees them.

A DeepSpeed config is a JSON dict whose fields must agree with each other and with the launch: the global batch
must equal micro-batch × accumulation × world size, offloading parameters needs ZeRO stage 3, fp16 and bf16
exclude each other, and so on. DeepSpeed reports some of these late or not at all; `validate` reports each one
by the field's name, up front.

The learning-rate schedule can stay with the training loop (the course's `lr_at`, set every step: the default) or
be handed to DeepSpeed as a `scheduler` entry (`schedule="warmup_cosine"`: its WarmupCosineLR, linear warmup).
The two curves are not the same (chapter 13 shows the off-by-one), so a run compared with the course's reference
keeps the loop's.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.arguments import positive_int

PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu", "nvme")
OPTIMIZERS = ("adamw", "sgd")  # torch's AdamW (the course's), or plain SGD (chapter 13's sum-vs-mean control)
SCHEDULES = ("loop", "warmup_cosine")  # who sets the learning rate: the training loop, or DeepSpeed's scheduler
DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


@dataclass(frozen=True)
class DeepSpeedSettings:
    micro_batch: int  # sequences per rank per forward pass ("train_micro_batch_size_per_gpu")
    accumulation: int = 1  # micro-batches whose gradients add up to one step
    world_size: int = 1  # data-parallel ranks
    zero_stage: int = 0
    precision: str = "fp32"
    offload_optimizer: str = "none"  # where ZeRO keeps optimizer states: GPU ("none"), CPU memory or NVMe
    offload_param: str = "none"  # stage 3 only: where the parameter shards live between uses
    nvme_path: str | None = None  # the folder an NVMe offload swaps to
    bucket_elements: int | None = None  # ZeRO's reduce/all-gather bucket size; None = DeepSpeed's default (5e8)
    grad_clip: float | None = 1.0  # max global gradient norm; None = off (written as 0: DeepSpeed defaults to 1)
    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    schedule: str = "loop"
    warmup_steps: int = 2  # warmup_cosine: steps from 0 up to lr
    total_steps: int | None = None  # warmup_cosine: the step at which the cosine reaches min_lr
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "warmup_cosine" and self.total_steps is None:
            raise ValueError("schedule='warmup_cosine' needs total_steps")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        for kind in ("offload_optimizer", "offload_param"):
            if getattr(self, kind) not in OFFLOADS:
                raise ValueError(f"{kind} must be one of {OFFLOADS}, got {getattr(self, kind)!r}")


def build(settings: DeepSpeedSettings) -> dict:
    """The DeepSpeed config for these settings (validated). The optimizer is torch's AdamW ("torch_adam": no
    compiled kernel needed) or torch's SGD without momentum, which ZeRO runs only when told it may
    ("zero_allow_untested_optimizer"). With the optimizer offloaded, AdamW is left to DeepSpeed, which then picks
    its compiled CPU Adam (`torch_adam` would make it run torch's AdamW on the CPU tensors, far slower). The
    learning rate is set by the training loop every step unless `schedule` hands it to DeepSpeed's WarmupCosineLR."""
    if settings.optimizer == "sgd":
        optimizer = {"type": "SGD", "params": {"lr": settings.lr, "weight_decay": settings.weight_decay}}
    else:
        optimizer = {"type": "AdamW", "params": {"lr": settings.lr, "betas": list(settings.betas),
                                                 "weight_decay": settings.weight_decay}}  # fmt: skip
        if settings.offload_optimizer == "none":
            optimizer["params"]["torch_adam"] = True
    config = {
        "train_batch_size": settings.micro_batch * settings.accumulation * settings.world_size,
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": settings.accumulation,
        "zero_optimization": {"stage": settings.zero_stage}
        | ({"reduce_bucket_size": settings.bucket_elements, "allgather_bucket_size": settings.bucket_elements}
           if settings.bucket_elements else {}),
        "optimizer": optimizer,
        "steps_per_print": 10**9,  # the course's loop reports progress itself
        "wall_clock_breakdown": False,
    }  # fmt: skip
    if settings.optimizer == "sgd" and settings.zero_stage:
        config["zero_allow_untested_optimizer"] = True  # DeepSpeed refuses an optimizer it has not tested otherwise
    config["gradient_clipping"] = 0.0 if settings.grad_clip is None else settings.grad_clip  # absent means 1.0
    if settings.schedule == "warmup_cosine":
        params = {
            "total_num_steps": settings.total_steps,
            "warmup_num_steps": settings.warmup_steps,
            "warmup_min_ratio": 0.0,
            "warmup_type": "linear",
            "cos_min_ratio": round(settings.min_lr / settings.lr, 12),  # 0.1, not 0.09999999999999999
        }
        config["scheduler"] = {"type": "WarmupCosineLR", "params": params}
    if settings.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif settings.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0 = dynamic scaling
    for kind in ("optimizer", "param"):
        device = getattr(settings, f"offload_{kind}")
        if device != "none":
            swap = {"nvme_path": settings.nvme_path} if device == "nvme" and settings.nvme_path else {}
            offload = {"device": device} | swap
            config["zero_optimization"][f"offload_{kind}"] = offload
    validate(config, settings.world_size)
    return config


def validate(config: dict, world_size: int) -> None:
    """Raise ValueError naming the first field that is missing or inconsistent."""
    positive_int("world_size", world_size)
    micro = positive_int("train_micro_batch_size_per_gpu", config.get("train_micro_batch_size_per_gpu"))
    accumulation = positive_int("gradient_accumulation_steps", config.get("gradient_accumulation_steps"))
    batch = positive_int("train_batch_size", config.get("train_batch_size"))
    if batch != micro * accumulation * world_size:
        raise ValueError(
            f"train_batch_size={batch} must equal train_micro_batch_size_per_gpu × gradient_accumulation_steps × "
            f"world size = {micro} × {accumulation} × {world_size} = {micro * accumulation * world_size}"
        )
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for kind, lowest in (("optimizer", 1), ("param", 3)):
        offload = zero.get(f"offload_{kind}")
        if offload is None:
            continue
        if offload.get("device") not in OFFLOADS[1:]:
            device = offload.get("device")
            raise ValueError(f"zero_optimization.offload_{kind}.device must be 'cpu' or 'nvme', got {device!r}")
        if stage < lowest:
            raise ValueError(f"zero_optimization.offload_{kind} needs ZeRO stage >= {lowest}, the stage is {stage}")
        if offload["device"] == "nvme" and not offload.get("nvme_path"):
            raise ValueError(f"zero_optimization.offload_{kind} on nvme needs an nvme_path")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ValueError("fp16 and bf16 are both enabled: choose one")
    clip = config.get("gradient_clipping", 1.0)  # DeepSpeed clips at 1.0 when the field is absent
    if not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"gradient_clipping must be a number >= 0 (0 = off), got {clip!r}")
    if "scheduler" in config:
        _validate_scheduler(config["scheduler"])


def _validate_scheduler(scheduler: dict) -> None:
    if scheduler.get("type") not in DEEPSPEED_SCHEDULERS:
        raise ValueError(f"scheduler.type must be one of {DEEPSPEED_SCHEDULERS}, got {scheduler.get('type')!r}")
    if scheduler["type"] != "WarmupCosineLR":
        return
    params = scheduler.get("params", {})
    total = positive_int("scheduler.params.total_num_steps", params.get("total_num_steps"))
    warmup = params.get("warmup_num_steps", 1000)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or not 2 <= warmup <= total:
        # DeepSpeed quietly raises 1 to 2 and only warns about a warmup longer than the run
        raise ValueError(f"scheduler.params.warmup_num_steps must be an int in [2, total_num_steps={total}], "
                         f"got {warmup!r}")  # fmt: skip
    for ratio in ("warmup_min_ratio", "cos_min_ratio"):
        value = params.get(ratio, 0.0)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"scheduler.params.{ratio} must be in [0, 1], got {value!r}")
    if params.get("warmup_type", "log") not in ("log", "linear"):
        # DeepSpeed only warns and falls back to "log"
        raise ValueError(f"scheduler.params.warmup_type must be 'log' or 'linear', got {params['warmup_type']!r}")

"""Every distributed entry point puts what it computes with on its rank's device.

On this CPU machine a rank's device is the CPU, where every tensor is created anyway, so a forgotten `place` passes
every other test and fails on the first GPU node: NCCL refuses CPU tensors, and a CPU tensor meeting a GPU one
raises. Here each entry point's `run` runs in this one process as rank r of 2 with the rank device `meta`, which
is not the CPU: mixing a meta tensor with a CPU one raises, as mixing cuda and cpu does. A fake process group
makes collectives return at once, and `PlacementGuard` fails any collective handed a tensor off the rank's device.
Meta tensors hold no values, so the numbers these runs produce mean nothing: only where the tensors live is
checked. Where a library refuses meta tensors (DDP, FSDP, DTensor, pipelining, batched send/recv, DeepSpeed), it is
replaced by a stand-in that checks what the entry point hands it. The negative control disables `place` in each
entry point: every run then fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from course_lib.parallel import (
    ddp,
    deepspeed_train,
    elastic,
    expert,
    hello,
    pipeline,
    ring_allreduce,
    tensor_parallel,
    zero,
)
from course_lib.parallel.common import Rank

META = torch.device("meta")
WORLD = 2


OWN_BUFFERS = ("c10d::barrier",)  # makes its own tensor, on the backend's device


class PlacementError(AssertionError):
    pass


class PlacementGuard(TorchDispatchMode):
    """Fails a collective handed a tensor that is not on the rank's device, and stands in for what meta tensors
    cannot do: `.item()` (a bool reads True, a number 1), copying values to the CPU (zeros) and bincount."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.collectives = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional") and func.name() not in OWN_BUFFERS:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            wrong = sorted({str(t.device) for t in tensors if t.device != self.device})
            if wrong:
                raise PlacementError(f"{func} was handed tensors on {wrong}; the rank's device is {self.device}")
            self.collectives.append(func.name())
        elif func is torch.ops.aten._local_scalar_dense.default and args[0].device == self.device:
            return True if args[0].dtype == torch.bool else 1
        elif func is torch.ops.aten.bincount.default and args[0].device == self.device:  # no meta kernel
            return torch.zeros(kwargs.get("minlength", args[2] if len(args) > 2 else 0), dtype=torch.long,
                               device=self.device)  # fmt: skip
        elif func is torch.ops.aten._to_copy.default and args[0].device == self.device:
            target = kwargs.get("device") or args[0].device
            if torch.device(target).type == "cpu":
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


@pytest.fixture
def fake_group(request, tmp_path, monkeypatch):
    """A world of 2 in this process, as rank `request.param`; results written to a temporary folder."""
    monkeypatch.setenv("COURSE_RESULT_DIR", str(tmp_path))
    dist.init_process_group("fake", store=FakeStore(), rank=request.param, world_size=WORLD)
    yield Rank(request.param, WORLD, META, 0)
    dist.destroy_process_group()


class StandIn:
    """Records whether everything a library was handed lives on the rank's device."""

    def __init__(self) -> None:
        self.handed: list[str] = []

    def check(self, what: str, tensors) -> None:
        wrong = sorted({str(t.device) for t in tensors if t.device != META})
        if wrong:
            raise PlacementError(f"{what} was handed tensors on {wrong}; the rank's device is {META}")
        self.handed.append(what)


def fsdp_stand_in(stand_in: StandIn):
    """FSDP's fully_shard refuses meta parameters: check the module and the mesh, leave the module unsharded."""

    def fully_shard(module, mesh=None, **_):
        stand_in.check("fully_shard's module", module.parameters())
        if mesh is None or mesh.device_type != META.type:
            raise PlacementError(f"fully_shard got a mesh on {getattr(mesh, 'device_type', None)}, not {META.type}")
        return module

    return fully_shard


class WrapperStandIn(torch.nn.Module):
    """DDP's place: checks the module it wraps and every input, then runs the module (DDP's own checks and bucket
    all-reduces need values that meta tensors do not have)."""

    def __init__(self, module, stand_in: StandIn, *_, **__) -> None:
        super().__init__()
        stand_in.check("DDP's module", module.parameters())
        self.module, self.stand_in = module, stand_in

    def forward(self, x):
        self.stand_in.check("DDP's input", [x])
        return self.module(x)

    def register_comm_hook(self, state, hook):
        pass


def ddp_stand_in(stand_in: StandIn):
    return lambda module, *args, **kwargs: WrapperStandIn(module, stand_in)


def parallelize_stand_in(stand_in: StandIn):
    """DTensor's tensor parallelism has no meta device handle: check the module and the mesh."""

    def parallelize_module(module, mesh, plan):
        stand_in.check("parallelize_module's module", module.parameters())
        if mesh.device_type != META.type:
            raise PlacementError(f"parallelize_module got a mesh on {mesh.device_type}, not {META.type}")
        return module

    return parallelize_module


class PipelineStageStandIn:
    """torch.distributed.pipelining sends between stages on the backend of the stage's device, which meta has not:
    check the stage's module and device, and run its forward on what the schedule is given."""

    def __init__(self, module, index, count, device, stand_in: StandIn) -> None:
        stand_in.check("PipelineStage's module", module.parameters())
        if device != META:
            raise PlacementError(f"PipelineStage was told device {device}, not {META}")
        self.module, self.stand_in = module, stand_in


class ScheduleStandIn:
    def __init__(self, stage: PipelineStageStandIn, microbatches, loss_fn, scale_grads=True) -> None:
        self.stage = stage

    def step(self, *inputs, target=None, losses=None):
        given = [t for t in (*inputs, target) if t is not None]
        self.stage.stand_in.check("the schedule's step", given)
        if inputs:
            self.stage.module(inputs[0])


class EngineStandIn(torch.nn.Module):
    """What run() uses of a DeepSpeed engine, with the engine's own placement (the model on its device)."""

    def __init__(self, model, optimizer, stand_in: StandIn) -> None:
        super().__init__()
        self.module, self.optimizer, self.stand_in, self.device = model.to(META), optimizer, stand_in, META

    def forward(self, x):
        self.stand_in.check("the engine's micro-batch", [x])
        return self.module(x)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return 0.0

    def train_micro_batch_size_per_gpu(self):
        return 1

    def zero_optimization_stage(self):
        return 0

    def gradient_accumulation_steps(self):
        return 1

    def destroy(self):
        pass


def deepspeed_stand_in(stand_in: StandIn):
    def initialize(model, model_parameters, config):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        return EngineStandIn(model, optimizer, stand_in), optimizer, None, None

    return initialize


def p2p_stand_in(stand_in: StandIn):
    """Batched send/recv goes through a coalescing path that needs the backend of the tensors' device (meta has
    none): check every tensor handed over, and return no work to wait for."""

    def batch_isend_irecv(ops):
        stand_in.check("batch_isend_irecv", [op.tensor for op in ops])
        return []

    return batch_isend_irecv


def run_ring(me, monkeypatch, stand_in, **_):
    monkeypatch.setattr(dist, "batch_isend_irecv", p2p_stand_in(stand_in))
    return ring_allreduce.run(ring_allreduce.parser().parse_args(["--sizes", "16", "--repeats", "1"]), me)


def run_tensor_parallel(me, mode, monkeypatch, stand_in, **_):
    import torch.distributed.tensor.parallel as tp_api

    monkeypatch.setattr(tp_api, "parallelize_module", parallelize_stand_in(stand_in))
    return tensor_parallel.run(tensor_parallel.parser().parse_args(["--mode", mode]), me)


def run_pipeline(me, monkeypatch, stand_in, **_):
    import torch.distributed.pipelining as pipelining

    monkeypatch.setattr(pipelining, "PipelineStage", lambda *a: PipelineStageStandIn(*a, stand_in))
    for name in ("ScheduleGPipe", "Schedule1F1B"):
        monkeypatch.setattr(pipelining, name, ScheduleStandIn)
    return pipeline.run(pipeline.parser().parse_args(["--steps", "1", "--layers", "2"]), me)


SMALL = ["--steps", "1", "--layers", "1", "--width", "16", "--block", "8"]


def run_zero(me, mode, monkeypatch, stand_in):
    import torch.distributed.fsdp as fsdp

    monkeypatch.setattr(fsdp, "fully_shard", fsdp_stand_in(stand_in))
    return zero.run(zero.parser().parse_args([*SMALL, "--mode", mode]), me)


def run_deepspeed(me, monkeypatch, stand_in):
    import deepspeed

    monkeypatch.setattr(deepspeed, "initialize", deepspeed_stand_in(stand_in))
    args = deepspeed_train.parser().parse_args(SMALL)
    args = ddp.for_world(args, me.world)
    return deepspeed_train.run(args, ddp.dataset(args), me.rank, me.world, deepspeed_train.Setting(2))


def run_elastic(me, tmp_path):
    return elastic.run(elastic.parser().parse_args([*SMALL, "--checkpoint-dir", str(tmp_path)]), me)


ENTRY_POINTS = {
    "hello": lambda me, **_: hello.run(hello.parser().parse_args([]), me),
    "ring_allreduce": lambda me, **kw: run_ring(me, **kw),
    "tensor_parallel explicit": lambda me, **kw: run_tensor_parallel(me, "explicit", **kw),
    "tensor_parallel dtensor": lambda me, **kw: run_tensor_parallel(me, "dtensor", **kw),
    "pipeline": lambda me, **kw: run_pipeline(me, **kw),
    "ddp": lambda me, **_: ddp.run(ddp.parser(controls=True).parse_args(SMALL), me),
    "zero ddp": lambda me, monkeypatch, stand_in, **_: run_zero(me, "ddp", monkeypatch, stand_in),
    "zero zero1": lambda me, monkeypatch, stand_in, **_: run_zero(me, "zero1", monkeypatch, stand_in),
    "zero fsdp": lambda me, monkeypatch, stand_in, **_: run_zero(me, "fsdp", monkeypatch, stand_in),
    "deepspeed_train": lambda me, monkeypatch, stand_in, **_: run_deepspeed(me, monkeypatch, stand_in),
    "elastic": lambda me, tmp_path, **_: run_elastic(me, tmp_path),
    "expert": lambda me, **_:  # no tokens: what each rank sends follows from values meta tensors do not have
     expert.run(expert.parser().parse_args(["--tokens", "0"]), me),
}
MODULES = {"hello": hello, "ring_allreduce": ring_allreduce, "tensor_parallel": tensor_parallel,
           "pipeline": pipeline, "ddp": ddp, "zero": zero, "deepspeed_train": deepspeed_train, "elastic": elastic,
           "expert": expert}  # fmt: skip


def run_placed(name, me, monkeypatch, tmp_path):
    stand_in = StandIn()
    for module in (ddp, elastic):
        monkeypatch.setattr(module, "DistributedDataParallel", ddp_stand_in(stand_in))
    with PlacementGuard(META) as guard:
        ENTRY_POINTS[name](me, monkeypatch=monkeypatch, stand_in=stand_in, tmp_path=tmp_path)
    return guard, stand_in


@pytest.mark.parametrize("fake_group", [0, 1], indirect=True, ids=["rank0", "rank1"])
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_entry_point_computes_on_the_rank_device(name, fake_group, monkeypatch, tmp_path):
    guard, stand_in = run_placed(name, fake_group, monkeypatch, tmp_path)
    assert guard.collectives or stand_in.handed, f"{name}: nothing was checked (no collective, no library call)"


@pytest.mark.parametrize("fake_group", [0], indirect=True, ids=["rank0"])
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_without_place_every_entry_point_fails(name, fake_group, monkeypatch, tmp_path):
    """The negative control: with `place` a no-op, what each entry point builds stays on the CPU."""
    module = MODULES[name.split()[0]]
    for attribute in ("place", "place_each"):
        if hasattr(module, attribute):
            monkeypatch.setattr(module, attribute, lambda thing, device: thing)
    with pytest.raises((PlacementError, RuntimeError)) as failure:
        run_placed(name, fake_group, monkeypatch, tmp_path)
    message = str(failure.value)
    assert "device" in message or "meta" in message, message

"""Pipeline parallelism: the chapter-05 GPT cut into one stage per rank and trained with
torch.distributed.pipelining's GPipe or 1F1B schedule, recording what each stage did and when.

Stage 0 holds the embeddings and the first blocks, the last stage the last blocks, the final LayerNorm and the
LM head. The embedding and the head are untied (`tie_weights=False`): tied, their shared matrix would live on
two ranks and its two gradients would have to be all-reduced between the first and last stage. A batch is cut
into micro-batches that flow through the stages; the schedule decides the order of forward (F) and backward (B)
passes on each stage. Each stage records that order, its busy intervals, and how many micro-batches it holds
activations for at once. `--sleep-ms` adds a fixed sleep to every F (and twice it to every B) so that the
timing of a tiny model is dominated by a known cost: the bubble then shows up cleanly.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.pipeline --schedule 1f1b --microbatches 4
`single_process_run(args)` trains the unsplit model on the same batches for comparison.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.device import seed_everything
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.common import Rank, finish, init, save_result, save_tensors
from course_lib.parallel.placement import place

SCHEDULES = ("gpipe", "1f1b")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="windows per step, cut into --microbatches")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep-ms", type=float, default=0.0, help="extra time per forward (backward: twice it)")
    p.add_argument("--no-grad-scaling", action="store_true", help="sum the micro-batch gradients (a wrong run)")
    return p


def build(args: argparse.Namespace) -> GPT:
    seed_everything(args.seed)
    config = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=4, n_embd=args.width,
                       tie_weights=False)  # fmt: skip
    return GPT(config).double()


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random token windows and targets (the schedule, not the data, is the subject here)."""
    generator = torch.Generator().manual_seed(args.seed + 1)

    def draw() -> torch.Tensor:
        return torch.randint(args.vocab, (args.batch, args.block), generator=generator)

    return [(draw(), draw()) for _ in range(args.steps)]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Stage(nn.Module):
    """A contiguous slice of the GPT: embeddings (first stage), some blocks, the head (last stage)."""

    def __init__(self, model: GPT, index: int, count: int) -> None:
        super().__init__()
        per_stage = len(model.blocks) // count
        self.first, self.last = index == 0, index == count - 1
        self.blocks = nn.ModuleList(model.blocks[index * per_stage : (index + 1) * per_stage])
        if self.first:
            self.wte, self.wpe = model.wte, model.wpe
        if self.last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)[0]
        return self.lm_head(self.ln_f(x)) if self.last else x


class Recorder:
    """Wraps a stage's forward and backward to log (kind, micro-batch, start, end), with times from
    time.perf_counter (one clock for all processes on a machine, so the ranks' timelines line up)."""

    def __init__(self, stage: Stage, sleep_s: float) -> None:
        self.events: list[tuple[str, int, float, float]] = []
        self.sleep_s = sleep_s
        # on a GPU the host runs ahead of the kernels: wait for them, so the times are when the work ran
        self.synchronize = torch.cuda.synchronize if next(stage.parameters()).is_cuda else lambda: None
        stage.register_forward_pre_hook(self._forward_start)
        stage.register_forward_hook(self._forward_end)
        stage.register_full_backward_pre_hook(self._backward_start)
        stage.register_full_backward_hook(self._backward_end)

    def _count(self, kind: str) -> int:
        return sum(1 for e in self.events if e[0] == kind)

    def _forward_start(self, module, inputs) -> None:
        self.synchronize()
        self._start = time.perf_counter()

    def _forward_end(self, module, inputs, output) -> None:
        self.synchronize()
        time.sleep(self.sleep_s)
        self.events.append(("F", self._count("F"), self._start, time.perf_counter()))

    def _backward_start(self, module, grad_output) -> None:
        self.synchronize()
        self._start = time.perf_counter()

    def _backward_end(self, module, grad_input, grad_output) -> None:
        self.synchronize()
        time.sleep(2 * self.sleep_s)
        self.events.append(("B", self._count("B"), self._start, time.perf_counter()))


def max_in_flight(events: list) -> int:
    """The most micro-batches a stage held activations for at once: forwarded, not yet backwarded."""
    held = most = 0
    for kind, *_ in sorted(events, key=lambda e: e[2]):
        held += 1 if kind == "F" else -1
        most = max(most, held)
    return most


def idle_fractions(results: list[dict]) -> tuple[list[float], float]:
    """The measured bubble of a run's last step: each stage's idle share, 1 - (its busy time) / span, where the span
    runs from the first stage's start to the last stage's end; and the span in seconds."""
    last = [r["steps"][-1] for r in results]
    span = max(s["end"] for s in last) - min(s["start"] for s in last)
    return [1 - sum(end - begin for _, _, begin, end in s["events"]) / span for s in last], span


def single_process_run(args: argparse.Namespace) -> tuple[GPT, list[float]]:
    """The reference: the unsplit model, each whole batch at once, plain SGD."""
    model = build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for x, y in batches(args):
        loss = loss_fn(model(x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def check_world(args: argparse.Namespace, world: int) -> None:
    """Raise a ValueError if the batch does not split into the micro-batches or the layers into `world` stages."""
    if args.microbatches < 1 or args.batch % args.microbatches:
        raise ValueError(f"--batch {args.batch} must split into --microbatches {args.microbatches} equal parts")
    if args.layers % world:
        raise ValueError(f"--layers {args.layers} must be divisible by the number of stages {world}")


def run(args: argparse.Namespace, me: Rank) -> dict:
    """This rank's stage trained for args.steps steps under the schedule; its events, losses and weights."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    # the first stage's input (token ids) needs no gradient; its backward hook then fires on the output's, as meant
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")
    check_world(args, me.world)
    model = build(args)
    stage_module = place(Stage(model, me.rank, me.world), me.device)
    names = {id(p): name for name, p in model.named_parameters()}  # the unsplit model's names, to compare with
    recorder = Recorder(stage_module, args.sleep_ms / 1000)
    stage = PipelineStage(stage_module, me.rank, me.world, me.device)
    schedule_class = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    schedule = schedule_class(stage, args.microbatches, loss_fn=loss_fn, scale_grads=not args.no_grad_scaling)
    optimizer = torch.optim.SGD(stage_module.parameters(), lr=args.lr)
    losses, steps = [], []
    for x, y in place(batches(args), me.device):
        dist.barrier()  # all stages start the step together
        recorder.events.clear()
        start = time.perf_counter()
        micro_losses: list[torch.Tensor] = []
        inputs = (x,) if me.rank == 0 else ()  # the first stage takes the tokens, the last the targets (one rank: both)
        targets = {"target": y, "losses": micro_losses} if me.rank == me.world - 1 else {}
        schedule.step(*inputs, **targets)
        steps.append({"start": start, "end": time.perf_counter(), "events": list(recorder.events)})
        optimizer.step()
        optimizer.zero_grad()
        losses.append(torch.stack(micro_losses).mean().item() if micro_losses else None)
    return {"rank": me.rank, "world": me.world, "schedule": args.schedule, "microbatches": args.microbatches,
            "steps": steps, "max_in_flight": max_in_flight(steps[-1]["events"]), "losses": losses,
            "weights": save_tensors("stage", {names[id(p)]: p for p in stage_module.parameters()})}  # fmt: skip


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()

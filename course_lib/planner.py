"""A planner for training on a cluster: every layout of data × tensor × pipeline parallelism and ZeRO stage, with
its memory per GPU (chapter 08's formulas, `course_lib.memory`), an estimated step time, and whether the training
engines accept it at all. Chapter 14 checks it against BLOOM-176B's published layout.

The step time adds its parts: compute, the pipeline bubble, and tensor, pipeline and data-parallel traffic. Added
with nothing overlapped, they bound the step from above (for what the model counts); `Plan.step_s_overlapped`
hides the data-parallel traffic behind the compute it can run under, the best case of what DDP's gradient buckets
and ZeRO's prefetching achieve. Left out either way: kernel launches, stage imbalance, stragglers.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.arguments import positive_int
from course_lib.memory import (
    RECIPES,
    MemoryBreakdown,
    ModelShape,
    Parallelism,
    PrecisionRecipe,
    per_device_memory,
    training_flops_per_token,
)


@dataclass(frozen=True)
class Cluster:
    """What a planner needs to know about the machines: how many GPUs, how they are grouped into nodes, their
    memory, their peak FLOP rate, and the bandwidth inside a node (NVLink) and between nodes (network), per GPU."""

    gpus: int
    gpus_per_node: int
    gpu_bytes: float  # device memory in bytes: an "80 GB" A100 holds 80 * GiB
    peak_flops: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float

    def __post_init__(self) -> None:
        positive_int("gpus", self.gpus)
        positive_int("gpus_per_node", self.gpus_per_node)
        if self.gpus % self.gpus_per_node:
            raise ValueError(f"gpus={self.gpus} must be whole nodes of gpus_per_node={self.gpus_per_node}")
        for name in ("gpu_bytes", "peak_flops", "intra_node_bytes_per_s", "inter_node_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def engine_refusal(parallel: Parallelism) -> str:
    """Why the training engines refuse a layout, or "" if they run it. Pipelines run many micro-batches per step;
    ZeRO-2 keeps only a shard of the gradients, so each micro-batch's gradients must be reduce-scattered before the
    next one adds to them (and ZeRO-3 gathers the weights again for every micro-batch). DeepSpeed's PipelineEngine
    asserts a ZeRO stage below 2, and Megatron-LM's distributed optimizer, which runs with its pipelines, shards
    the optimizer state only (ZeRO-1)."""
    if parallel.pp > 1 and parallel.zero_stage >= 2:
        return (f"ZeRO-{parallel.zero_stage} with a pipeline: DeepSpeed's PipelineEngine accepts ZeRO stages 0 and 1 "
                "only; Megatron-LM's distributed optimizer is ZeRO-1")  # fmt: skip
    return ""


def data_parallel_bytes(n_params: float, recipe: PrecisionRecipe, zero_stage: int, micro_batches: int) -> float:
    """Bytes of the collectives one data-parallel group runs per step over `n_params` (the local model split);
    a ring sends (dp - 1)/dp of them per rank. Stages 0 and 1 accumulate the micro-batches' gradients in a full
    buffer and reduce once: an all-reduce (reduce-scatter + all-gather) of the gradients, or ZeRO-1's reduce-scatter
    of the gradients and all-gather of the updated weights. Stage 2 keeps a shard of the gradients only, so it
    reduce-scatters after every micro-batch; stage 3 also all-gathers the weights for every micro-batch's forward
    and again for its backward (and never gathers the updated ones)."""
    Parallelism(zero_stage=zero_stage)  # validates the stage
    positive_int("micro_batches", micro_batches)
    grads, weights = n_params * recipe.gradient_bytes, n_params * recipe.weight_bytes
    return {0: 2 * grads, 1: grads + weights, 2: micro_batches * grads + weights,
            3: micro_batches * (grads + 2 * weights)}[zero_stage]  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """One way to lay a training run out on a cluster: its memory per GPU, whether it fits and whether the engines
    accept it (`reason` says why not), and its estimated step time in parts. `data_window_s` is the compute the
    data-parallel traffic can run behind: the last micro-batch's for ZeRO 0 and 1 (the gradients are complete only
    then), all of it for ZeRO 2 and 3 (each micro-batch's traffic runs behind its own compute).
    GPUs are numbered tensor-parallel first, then data-parallel, then pipeline stage (Megatron's order), so a
    tensor-parallel group shares a node and the pipeline's neighbours are the farthest apart."""

    parallel: Parallelism
    memory: MemoryBreakdown
    fits: bool
    reason: str  # why an engine refuses the layout; "" if it runs it
    compute_s: float
    bubble_s: float
    tensor_comm_s: float
    pipeline_comm_s: float
    data_comm_s: float
    data_window_s: float
    hardware_flops: float  # per step, the whole cluster: what the GPUs execute, the recomputed forward included
    model_flops: float  # per step: 6N + attention per token, what the model needs (chapter 08's MFU)
    cluster_peak_flops: float

    @property
    def feasible(self) -> bool:
        return not self.reason

    @property
    def usable(self) -> bool:
        """It fits, and an engine runs it."""
        return self.fits and self.feasible

    @property
    def step_s(self) -> float:
        """The parts added, nothing overlapped: the upper bound of this cost model."""
        return self.compute_s + self.bubble_s + self.tensor_comm_s + self.pipeline_comm_s + self.data_comm_s

    @property
    def step_s_overlapped(self) -> float:
        """The data-parallel traffic hidden behind the compute it can run under: the best case of overlap."""
        exposed = max(0.0, self.data_comm_s - self.data_window_s)
        return self.compute_s + self.bubble_s + self.tensor_comm_s + self.pipeline_comm_s + exposed

    def hfu(self, overlap: bool = False) -> float:
        """Hardware FLOP utilisation of the whole step: executed FLOPs (recompute included) / (time × peak)."""
        return self.hardware_flops / ((self.step_s_overlapped if overlap else self.step_s) * self.cluster_peak_flops)

    def mfu(self, overlap: bool = False) -> float:
        """Model FLOP utilisation (chapter 08): the FLOPs the model needs, without the recompute, / (time × peak)."""
        return self.hfu(overlap) * self.model_flops / self.hardware_flops


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plan_parallelism(
    shape: ModelShape,
    cluster: Cluster,
    seq: int,
    global_batch: int,
    recipe: PrecisionRecipe = RECIPES["mixed"],
    checkpointing: bool = True,
    compute_hfu: float = 0.5,
    sequence_parallel: bool = True,
    overlap: bool = False,
    headroom: float = 0.0,
) -> list[Plan]:
    """Every layout of the cluster's GPUs as data × tensor × pipeline parallel (tensor parallelism inside a node
    and dividing the heads, at most one pipeline stage per layer) × ZeRO stage, with micro-batches of one sequence
    (a larger one would cut ZeRO-2 and 3's per-micro-batch traffic where memory allows; not tried here).

    Best first: plans that fit and that an engine runs, then by estimated step time (`overlap`: hidden data-
    parallel traffic), then the lower ZeRO stage (the simpler engine, for the same time), then memory.
    `compute_hfu` is the fraction of the GPUs' peak at which the compute runs, counted in hardware FLOPs (with
    checkpointing the recomputed forward too, as Megatron's and BLOOM's published TFLOP/s are); each plan reports
    its whole-step `hfu()` and chapter 08's `mfu()`. `sequence_parallel=False` keeps the activations that Megatron's
    sequence parallelism splits whole on every tensor rank. Stages that do not divide the layers evenly are costed
    as the average stage (frameworks balance them, counting the embeddings too). A plan fits when its memory plus
    `headroom` bytes, kept free for what the formulas leave out (buffers, the allocator's cache), fit the GPU."""
    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape, got {type(shape).__name__}")
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    positive_int("seq", seq)
    positive_int("global_batch", global_batch)
    if not 0 < compute_hfu <= 1:
        raise ValueError(f"compute_hfu must be in (0, 1], got {compute_hfu!r}")
    if not 0 <= headroom < cluster.gpu_bytes:
        raise ValueError(f"headroom must be at least 0 and below gpu_bytes={cluster.gpu_bytes}, got {headroom!r}")
    tokens, peak = global_batch * seq, cluster.gpus * cluster.peak_flops
    hardware_flops = training_flops_per_token(shape, seq, checkpointing) * tokens
    model_flops = training_flops_per_token(shape, seq) * tokens
    compute_s = hardware_flops / (peak * compute_hfu)
    activation = seq * shape.d_model * recipe.activation_bytes  # one sequence's (seq x d) activation
    plans = []
    for tp in _divisors(cluster.gpus_per_node):
        if shape.n_head % tp:
            continue
        for pp in range(1, shape.n_layer + 1):
            if cluster.gpus % (tp * pp) or global_batch % (cluster.gpus // (tp * pp)):
                continue
            dp = cluster.gpus // (tp * pp)
            micro_batches = global_batch // dp  # per pipeline and step, one sequence each
            # per layer and micro-batch 2 all-reduces forward, 2 backward and 2 more in the recomputed forward, of
            # one (seq x d) activation, ring traffic, over NVLink
            all_reduces = 6 if checkpointing else 4
            tensor_comm_s = (all_reduces * 2 * (tp - 1) / tp * activation * shape.n_layer / pp * micro_batches
                             / cluster.intra_node_bytes_per_s)  # fmt: skip
            bubble_s = compute_s * (pp - 1) / micro_batches
            # each micro-batch's activation goes to the next stage forward and its gradient back, split over tp
            pipeline_link = cluster.intra_node_bytes_per_s if tp * dp * pp <= cluster.gpus_per_node else \
                cluster.inter_node_bytes_per_s  # fmt: skip
            pipeline_comm_s = (pp > 1) * micro_batches * 2 * activation / tp / pipeline_link
            link = cluster.inter_node_bytes_per_s if dp * tp > cluster.gpus_per_node else cluster.intra_node_bytes_per_s
            for stage in range(4):
                parallel = Parallelism(dp, tp, pp, stage)
                memory = per_device_memory(shape, 1, seq, recipe, "adam", checkpointing, parallel,
                                           sequence_parallel=sequence_parallel)  # fmt: skip
                data_bytes = data_parallel_bytes(shape.n_params / (tp * pp), recipe, stage, micro_batches)
                plans.append(Plan(
                    parallel, memory, fits=memory.total + headroom <= cluster.gpu_bytes,
                    reason=engine_refusal(parallel), compute_s=compute_s, bubble_s=bubble_s,
                    tensor_comm_s=tensor_comm_s, pipeline_comm_s=pipeline_comm_s,
                    data_comm_s=(dp - 1) / dp * data_bytes / link,
                    data_window_s=compute_s / (micro_batches if stage < 2 else 1),
                    hardware_flops=hardware_flops, model_flops=model_flops, cluster_peak_flops=peak,
                ))  # fmt: skip
    if not plans:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by the data-parallel degree of any layout of "
            f"{cluster.gpus} GPUs (tensor degree dividing n_head={shape.n_head} and "
            f"gpus_per_node={cluster.gpus_per_node}, pipeline degree at most n_layer={shape.n_layer})"
        )
    return sorted(plans, key=lambda p: (not p.usable, p.step_s_overlapped if overlap else p.step_s,
                                        p.parallel.zero_stage, p.memory.total))  # fmt: skip

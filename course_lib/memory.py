"""Where the memory and the compute of a transformer go, as formulas that chapter 08 checks against measurements
and chapters 12-14 (and the memory calculator) reuse.

Memory per device is one `MemoryBreakdown`: parameters, gradients, optimizer state, activations, KV cache. The
first three come from a `PrecisionRecipe` (bytes per parameter for each); activations from what autograd saves
per layer (counted for the course's GPT and checked byte for byte in chapter 08); the KV cache from the keys and
values an inference server keeps. FLOPs per token follow the 6N rule (8N with activation checkpointing) plus
attention's term that grows with the context. `course_lib.planner` lays these out on a cluster (chapter 14).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from course_lib.arguments import positive_int

GiB = 2**30  # device memory is sized in binary units: an A100 sold as "80 GB" holds 80 GiB (80 × 2³⁰ bytes)
ADAM_STATES = {"adam": 2, "sgd_momentum": 1, "sgd": 0}  # fp32 tensors per parameter the optimizer keeps


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes, by what they hold."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __add__(self, other: MemoryBreakdown) -> MemoryBreakdown:
        return MemoryBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass(frozen=True)
class PrecisionRecipe:
    """Bytes per parameter (and per activation element) of a way of training.

    `master_copy`: the optimizer keeps an fp32 copy of 16-bit weights (4 bytes per parameter); the optimizer's
    own states (Adam's m and v) are fp32 on top of it."""

    name: str
    weight_bytes: int
    gradient_bytes: int
    master_copy: bool
    activation_bytes: int

    def optimizer_bytes(self, optimizer: str = "adam") -> int:
        if optimizer not in ADAM_STATES:
            raise ValueError(f"optimizer must be one of {tuple(ADAM_STATES)}, got {optimizer!r}")
        return 4 * self.master_copy + 4 * ADAM_STATES[optimizer]


RECIPES = {
    # everything in fp32: 4 + 4 + 8 = 16 bytes per parameter with Adam
    "fp32": PrecisionRecipe("fp32", weight_bytes=4, gradient_bytes=4, master_copy=False, activation_bytes=4),
    # the ZeRO paper's mixed precision: fp16 weights and gradients, fp32 master weights, m and v: 2 + 2 + 12 = 16
    "mixed": PrecisionRecipe(
        "fp16/bf16 weights + fp32 master (ZeRO paper)",
        weight_bytes=2,
        gradient_bytes=2,
        master_copy=True,
        activation_bytes=2,
    ),  # fmt: skip
    # torch.autocast: fp32 weights, gradients and Adam (16 bytes), 16-bit matmul outputs among the activations
    "autocast": PrecisionRecipe(
        "torch autocast (bf16/fp16)", weight_bytes=4, gradient_bytes=4, master_copy=False, activation_bytes=2
    ),  # fmt: skip
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory or FLOP formula needs. `mlp="gelu"` is GPT-2's two-matrix MLP (biases, LayerNorm with
    bias, learned positions); `mlp="swiglu"` is LLaMA's three-matrix MLP (no biases, RMSNorm, rotary positions)."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    context: int
    n_kv_head: int | None = None  # fewer key/value heads than query heads: grouped-query attention (GQA)
    d_ff: int | None = None  # the MLP's hidden width; default 4 * d_model
    mlp: str = "gelu"
    tied: bool = True  # the LM head shares the token embedding

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "context"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and (positive_int("n_kv_head", self.n_kv_head) > self.n_head
                                           or self.n_head % self.n_kv_head):  # fmt: skip
            raise ValueError(f"n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head}")
        if self.d_ff is not None:
            positive_int("d_ff", self.d_ff)
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")

    @classmethod
    def from_gpt_config(cls, config, name: str = "course GPT") -> ModelShape:
        """The shape of a course_lib.model.GPTConfig (learned positions, biases, as GPT-2)."""
        if config.positions != "learned" or not config.bias:
            raise ValueError("from_gpt_config counts GPT-2-style models: positions='learned' and bias=True")
        return cls(name, config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.block_size,
                   tied=config.tie_weights)  # fmt: skip

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def hidden(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def matmul_params(self) -> int:
        """N of the 6N rule: the weights every token is multiplied by, the blocks' matrices and the LM head
        (the embedding is a lookup, not a multiplication)."""
        d, attention = self.d_model, 2 * self.d_model**2 + 2 * self.d_model * self.kv_dim
        mlp = (2 if self.mlp == "gelu" else 3) * d * self.hidden
        return self.n_layer * (attention + mlp) + self.vocab_size * d

    @property
    def n_params(self) -> int:
        """Every parameter, counted as the model defines them (for GPT-2 small: 124,439,808)."""
        d, L = self.d_model, self.n_layer
        embeddings = self.vocab_size * d * (1 if self.tied else 2)
        if self.mlp == "gelu":  # biases on every Linear, LayerNorm gain and bias, learned positions
            biases = L * (3 * d + 2 * self.kv_dim + self.hidden) + L * 4 * d + 2 * d
            return self.matmul_params - self.vocab_size * d + embeddings + biases + self.context * d
        return self.matmul_params - self.vocab_size * d + embeddings + L * 2 * d + d  # RMSNorm gains only


def state_bytes(n_params: int, recipe: PrecisionRecipe, optimizer: str = "adam") -> MemoryBreakdown:
    """Parameters, gradients and optimizer state of n_params parameters, unsharded."""
    return MemoryBreakdown(parameters=n_params * recipe.weight_bytes, gradients=n_params * recipe.gradient_bytes,
                           optimizer=n_params * recipe.optimizer_bytes(optimizer))  # fmt: skip


def sharded_state_bytes(
    n_params: float, recipe: PrecisionRecipe, optimizer: str = "adam", dp: int = 1, zero_stage: int = 0
) -> MemoryBreakdown:
    """Parameters, gradients and optimizer state on one of dp data-parallel ranks under ZeRO: stage 1 shards the
    optimizer state, stage 2 also the gradients, stage 3 also the parameters (the paper's 2Ψ + 2Ψ + KΨ, each
    term divided by dp from its stage on)."""
    parallel = Parallelism(dp=dp, zero_stage=zero_stage)  # validates dp and the stage
    states = state_bytes(n_params, recipe, optimizer)
    return MemoryBreakdown(parameters=states.parameters / (dp if parallel.zero_stage >= 3 else 1),
                           gradients=states.gradients / (dp if parallel.zero_stage >= 2 else 1),
                           optimizer=states.optimizer / (dp if parallel.zero_stage >= 1 else 1))  # fmt: skip


def activation_elements_per_layer(shape: ModelShape, batch: int, seq: int, attention: str = "fused") -> int:
    """Elements one block saves for backward (counted for the course GPT's pre-LN block, chapter 08):
    LayerNorm inputs and outputs (4 BTd) and their mean and 1/std (4 BT), q, k, v (BT(d + 2 kv)), the attention
    output (BTd), the MLP's hidden pre- and post-activation (2 BT d_ff; SwiGLU's three Linear layers save 4 BT d_ff).
    Fused attention (SDPA, flash) keeps one log-sum-exp per query and head (BHT). `attention="explicit"` counts
    one B·H·T² tensor, the softmax probabilities, instead: a lower bound, since chapter 08 measured the course's
    plain path keeping two such tensors and a boolean mask (9 bytes per pair in fp32, 5 in bf16).
    Not counted: dropout masks (dropout 0, as the course trains) and, for LLaMA as `transformers` writes it,
    the normalised x each RMSNorm keeps for its gain's gradient (2BTd more per layer, measured in chapter 08)."""
    positive_int("batch", batch)
    positive_int("seq", seq)
    bt, d = batch * seq, shape.d_model
    mlp = (2 if shape.mlp == "gelu" else 4) * shape.hidden
    per_token = 4 * d + 4 + d + 2 * shape.kv_dim + d + mlp
    if attention == "fused":
        return bt * per_token + batch * shape.n_head * seq
    if attention == "explicit":
        return bt * per_token + batch * shape.n_head * seq * seq
    raise ValueError(f"attention must be 'fused' or 'explicit', got {attention!r}")


def activation_bytes(
    shape: ModelShape, batch: int, seq: int, bytes_per_element: int = 4, checkpointing: bool = False,
    attention: str = "fused",
) -> int:  # fmt: skip
    """Bytes saved for backward by all blocks: every layer's activations, or with activation checkpointing only
    each block's input (B·T·d). The embedding and LM head add a little more (counted in chapter 08)."""
    if checkpointing:
        return shape.n_layer * batch * seq * shape.d_model * bytes_per_element
    return shape.n_layer * activation_elements_per_layer(shape, batch, seq, attention) * bytes_per_element


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, bytes_per_element: int = 2) -> int:
    """Keys and values of every layer for `seq` tokens of `batch` sequences: 2·L·n_kv·d_head·T·B·bytes. Grouped-
    query attention shrinks it by n_head / n_kv_head."""
    positive_int("batch", batch)
    positive_int("seq", seq)
    return 2 * shape.n_layer * shape.kv_heads * shape.head_size * seq * batch * bytes_per_element


def training_flops_per_token(shape: ModelShape, seq: int, checkpointing: bool = False) -> int:
    """Matmul FLOPs to train on one token at context `seq`: forward 2N + attention 4·L·T·d (QKᵀ and the weighted
    sum over all T keys), backward twice the forward (6N in all). Activation checkpointing runs the blocks'
    forward once more, which makes it about 8N (the LM head is not recomputed)."""
    positive_int("seq", seq)
    attention = 4 * shape.n_layer * seq * shape.d_model
    forward = 2 * shape.matmul_params + attention
    recompute = 2 * (shape.matmul_params - shape.vocab_size * shape.d_model) + attention if checkpointing else 0
    return 3 * forward + recompute


def matmul_intensity(m: int, k: int, n: int, bytes_per_element: int = 2) -> float:
    """FLOPs per byte moved of (m×k) @ (k×n): 2mkn / ((mk + kn + mn)·bytes). Decoding one token per sequence
    has m = batch, so reading the weights (k×n) dominates and the GPU waits on memory; prefill has m = batch·T."""
    for name, value in (("m", m), ("k", k), ("n", n), ("bytes_per_element", bytes_per_element)):
        positive_int(name, value)
    return 2 * m * k * n / ((m * k + k * n + m * n) * bytes_per_element)


@dataclass(frozen=True)
class Parallelism:
    """How the devices split the work: data (dp), tensor (tp) and pipeline (pp) degrees, and the ZeRO stage
    (1: optimizer state sharded over dp, 2: and gradients, 3: and parameters)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            positive_int(name, getattr(self, name))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp


def per_device_memory(
    shape: ModelShape,
    batch: int,
    seq: int,
    recipe: PrecisionRecipe = RECIPES["mixed"],
    optimizer: str = "adam",
    checkpointing: bool = False,
    parallel: Parallelism = Parallelism(),
    inference: bool = False,
    sequence_parallel: bool = True,
) -> MemoryBreakdown:
    """Bytes on one device. Tensor and pipeline parallelism split the model (each device holds 1/(tp·pp) of the
    weights and of each micro-batch's activations: with 1F1B the first stage keeps pp micro-batches in flight,
    each over L/pp layers); ZeRO splits the states over the dp replicas from stage 1 (optimizer) to 3
    (parameters). `batch` is the micro-batch per data-parallel replica. Inference keeps weights and the KV cache.

    Dividing *every* activation by tp (the default) assumes Megatron's sequence parallelism (Korthikanti et al.
    2022: sbh(34/t + 5as/(ht)) bytes per layer), which splits the LayerNorm inputs, outputs and statistics and the
    checkpointed block inputs along the sequence. `sequence_parallel=False` keeps those (4d + 4)·B·T elements per
    layer (B·T·d with checkpointing: all of them) whole on every tensor-parallel rank and divides only the rest by
    tp (chapter 08 prints the difference for LLaMA-2 7B). Not counted: the loss's B·T·V log-softmax, the one block
    whose activations backward rebuilds at a time under checkpointing, temporary buffers and allocator fragmentation."""
    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape, got {type(shape).__name__}")
    if parallel.tp > shape.n_head or shape.n_head % parallel.tp:
        raise ValueError(f"tp={parallel.tp} must divide n_head={shape.n_head}: tensor parallelism splits the heads")
    if parallel.pp > shape.n_layer:
        raise ValueError(f"pp={parallel.pp} must be at most n_layer={shape.n_layer}: each stage needs a layer")
    if seq > shape.context:
        raise ValueError(f"seq={seq} exceeds the model's context={shape.context}")
    model_split = parallel.tp * parallel.pp
    weights = shape.n_params * recipe.weight_bytes / model_split
    if inference:
        kv = kv_cache_bytes(shape, batch, seq, recipe.activation_bytes) / model_split
        return MemoryBreakdown(parameters=weights, kv_cache=kv)
    states = sharded_state_bytes(shape.n_params / model_split, recipe, optimizer, parallel.dp, parallel.zero_stage)
    activations = activation_bytes(shape, batch, seq, recipe.activation_bytes, checkpointing)
    whole = 0 if sequence_parallel else (
        shape.n_layer * batch * seq * (shape.d_model if checkpointing else 4 * shape.d_model + 4)
        * recipe.activation_bytes)  # fmt: skip
    return states + MemoryBreakdown(activations=whole + (activations - whole) / parallel.tp)

"""A small GPT in one file: the model chapters 03-05 build, and the distributed chapters split and shard.

    tokens -> token embedding (+ learned positions, or RoPE inside attention) -> dropout
           -> n_layer x Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))      (pre-LayerNorm)
           -> ln_f -> lm_head (tied to the token embedding by default) -> logits over the vocabulary

Shaped for the course: separate q/k/v projections (tensor parallelism splits them by heads), the blocks a
plain list (pipeline stages and FSDP wrap them one by one), attention weights on request (for the heat
maps), a KV cache for generation, and conversion to and from `transformers.GPT2LMHeadModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib.arguments import positive_int
from course_lib.attention import scaled_dot_product_attention
from course_lib.masks import causal_mask

POSITION_KINDS = ("learned", "rope")

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values (B, H, T_past, d_head)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # the context length: the most positions the model attends over
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    tie_weights: bool = True  # lm_head shares the token embedding matrix, as GPT-2
    positions: str = "learned"  # "learned" (GPT-2) or "rope" (rotary, as LLaMA)
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"RoPE rotates pairs: the head size n_embd/n_head={self.n_embd // self.n_head} must be even"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def rope_cos_sin(positions: torch.Tensor, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_size) for rotary embeddings: pair (i, i + head_size/2) of a query or key at
    position p is rotated by the angle p · base^(-2i/head_size)."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise ValueError("positions must be a 1-D tensor of token positions")
    if not isinstance(head_size, int) or head_size < 2 or head_size % 2:
        raise ValueError(f"head_size must be an even int >= 2 (RoPE rotates pairs), got {head_size!r}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of the last dimension of x (..., T, head_size) by the angles in cos/sin (T, head_size).
    A rotation keeps lengths, and q·k then depends only on the distance between the two positions."""
    try:
        fits = (
            cos.shape == sin.shape and x.shape[-1] == cos.shape[-1] and bool(torch.broadcast_shapes(x.shape, cos.shape))
        )
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"x (..., T, head_size) {tuple(x.shape)} must broadcast with cos and sin (T, head_size) {tuple(cos.shape)}"
        )
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.out_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, H, T, d_head)
        # H from the width, not the config: under tensor parallelism a rank holds only its share of the heads
        b, t, _ = x.shape
        return x.view(b, t, -1, self.config.head_size).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Returns the output, this layer's keys and values including `past` (the KV cache), and the
        attention weights (B, H, T, T_past + T) when asked for."""
        b, t, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n_past = 0
        if past is not None:
            n_past = past[0].shape[2]
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        weights = None
        if return_weights:
            out, weights = scaled_dot_product_attention(q, k, v, mask=causal_mask(t, x.device, n_past))
        else:
            dropout = self.config.dropout if self.training else 0.0
            mask = None if n_past == 0 else causal_mask(t, x.device, n_past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=n_past == 0, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.resid_dropout(self.out_proj(out)), (k, v), weights


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: each sublayer reads a normalised copy and adds its result to the stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, past=None, rope=None, return_weights=False):
        attended, present, weights = self.attn(self.ln_1(x), past, rope, return_weights)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present, weights


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # mean cross-entropy when targets were given
    past: KVCache | None = None  # keys and values of every layer, when use_cache=True
    attentions: list[torch.Tensor] | None = None  # per layer (B, H, T, T_past + T), when asked for


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 n_layer)
            if name.endswith(("out_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        past: KVCache | None = None,
        use_cache: bool = False,
        return_attention: bool = False,
    ) -> GPTOutput:
        """Logits for every position of idx (B, T); with `past` (a KV cache from an earlier call) the T new
        tokens continue that sequence."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got {getattr(idx, 'shape', idx)}")
        b, t = idx.shape
        n_past = 0 if past is None else past[0][0].shape[2]
        if past is not None and len(past) != self.config.n_layer:
            raise ValueError(f"past must hold keys and values for all {self.config.n_layer} layers, got {len(past)}")
        if n_past + t > self.config.block_size:
            raise ValueError(
                f"{n_past} cached + {t} new tokens exceed block_size={self.config.block_size}: crop the context"
            )
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        positions = torch.arange(n_past, n_past + t, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rope_cos_sin(positions, self.config.head_size, self.config.rope_base)
        x = self.drop(x)
        presents, attentions = [], []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and past is None and not return_attention:
                # Keep only the block's input; backward re-runs the block to get what it needs.
                x = checkpoint(lambda h, b=block: b(h, None, rope)[0], x, use_reentrant=False)
                present, weights = None, None
            else:
                x, present, weights = block(x, None if past is None else past[i], rope, return_attention)
            presents.append(present)
            attentions.append(weights)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return GPTOutput(logits, loss, presents if use_cache else None, attentions if return_attention else None)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T). With the KV cache each step feeds only the
        newest token; once the context is full, the oldest tokens are dropped and the cache rebuilt."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        was_training = self.training
        self.eval()
        past = None
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            if not use_cache or past is None or past[0][0].shape[2] >= self.config.block_size:
                out = self(context, use_cache=use_cache)  # (re)build the cache from the whole window
            else:
                out = self(idx[:, -1:], past=past, use_cache=True)
            past = out.past
            probs = next_token_probs(out.logits[:, -1], temperature, top_k, top_p)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        self.train(was_training)
        return idx


def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution the next token is sampled from: logits / temperature, keep the top_k most likely
    tokens and the smallest set whose probability reaches top_p, renormalise. temperature=0 is greedy."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the more likely tokens
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def to_gpt2_config(config: GPTConfig):
    """The `transformers.GPT2Config` of the same model (GPT-2 has learned positions and biases)."""
    from transformers import GPT2Config

    if config.positions != "learned" or not config.bias:
        raise ValueError("only a GPT with positions='learned' and bias=True has a GPT-2 equivalent")
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, activation_function="gelu_new", resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=1e-5,
        tie_word_embeddings=config.tie_weights, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def _gpt2_state(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names. GPT-2 fuses q, k, v into one Conv1D (c_attn), and a Conv1D stores
    the transpose of a Linear's weight: y = x W + b."""
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias,
             "lm_head.weight": model.lm_head.weight}  # fmt: skip
    for i, block in enumerate(model.blocks):
        h, attn = f"transformer.h.{i}.", block.attn
        state |= {
            h + "ln_1.weight": block.ln_1.weight, h + "ln_1.bias": block.ln_1.bias,
            h + "ln_2.weight": block.ln_2.weight, h + "ln_2.bias": block.ln_2.bias,
            h + "attn.c_attn.weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T,
            h + "attn.c_attn.bias": torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
            h + "attn.c_proj.weight": attn.out_proj.weight.T, h + "attn.c_proj.bias": attn.out_proj.bias,
            h + "mlp.c_fc.weight": block.mlp.fc.weight.T, h + "mlp.c_fc.bias": block.mlp.fc.bias,
            h + "mlp.c_proj.weight": block.mlp.proj.weight.T, h + "mlp.c_proj.bias": block.mlp.proj.bias,
        }  # fmt: skip
    return state


@torch.no_grad()
def to_gpt2(model: GPT):
    """A `transformers.GPT2LMHeadModel` with the same weights (built from a config: nothing is downloaded)."""
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a course_lib GPT, got {type(model).__name__}")
    hf = GPT2LMHeadModel(to_gpt2_config(model.config))
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    for name, value in _gpt2_state(model).items():
        hf_params[name].copy_(value)
    return hf.train(model.training)


@torch.no_grad()
def from_gpt2(hf_model) -> GPT:
    """Our GPT with the weights of a `transformers.GPT2LMHeadModel` (c_attn split back into q, k, v)."""
    c = getattr(hf_model, "config", None)
    if getattr(c, "model_type", None) != "gpt2" or c.n_inner not in (None, 4 * c.n_embd):
        raise ValueError("hf_model must be a transformers GPT2LMHeadModel with the standard 4 x n_embd MLP")
    config = GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, dropout=c.resid_pdrop, tie_weights=c.tie_word_embeddings)  # fmt: skip
    hf = dict(hf_model.named_parameters(remove_duplicate=False))
    state = {"wte.weight": hf["transformer.wte.weight"], "wpe.weight": hf["transformer.wpe.weight"],
             "ln_f.weight": hf["transformer.ln_f.weight"], "ln_f.bias": hf["transformer.ln_f.bias"],
             "lm_head.weight": hf["lm_head.weight"]}  # fmt: skip
    for i in range(c.n_layer):
        h, o = f"transformer.h.{i}.", f"blocks.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].T.chunk(3)
        q_bias, k_bias, v_bias = hf[h + "attn.c_attn.bias"].chunk(3)
        state |= {
            o + "ln_1.weight": hf[h + "ln_1.weight"], o + "ln_1.bias": hf[h + "ln_1.bias"],
            o + "ln_2.weight": hf[h + "ln_2.weight"], o + "ln_2.bias": hf[h + "ln_2.bias"],
            o + "attn.q_proj.weight": q, o + "attn.k_proj.weight": k, o + "attn.v_proj.weight": v,
            o + "attn.q_proj.bias": q_bias, o + "attn.k_proj.bias": k_bias, o + "attn.v_proj.bias": v_bias,
            o + "attn.out_proj.weight": hf[h + "attn.c_proj.weight"].T,
            o + "attn.out_proj.bias": hf[h + "attn.c_proj.bias"],
            o + "mlp.fc.weight": hf[h + "mlp.c_fc.weight"].T, o + "mlp.fc.bias": hf[h + "mlp.c_fc.bias"],
            o + "mlp.proj.weight": hf[h + "mlp.c_proj.weight"].T, o + "mlp.proj.bias": hf[h + "mlp.c_proj.bias"],
        }  # fmt: skip
    model = GPT(config)
    model.load_state_dict(state)
    return model.train(hf_model.training)

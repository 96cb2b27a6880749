"""Attention heat maps of real models: type a prompt, pick a layer, a head and a query, and see where that
head looks. Works for the course GPT (chapter 05) and for a pretrained `transformers` encoder (MiniLM in
chapter 06), through functions that turn a text into tokens and attention weights.
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from course_lib.model import GPT
from course_lib.widgets.render import SnapshotMixin, figure_to_png, html_table, visible_token

# text -> (token strings, attention weights (n_layer, n_head, T, T))
AttentionFn = Callable[[str], tuple[list[str], torch.Tensor]]


def gpt_attention(model: GPT, tokenizer) -> AttentionFn:
    """Attention weights of a course GPT on a text encoded by `tokenizer` (encode/decode)."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a course_lib GPT, got {type(model).__name__}")

    def attend(text: str) -> tuple[list[str], torch.Tensor]:
        ids = (tokenizer.encode(text) or [0])[-model.config.block_size :]
        with torch.no_grad():
            out = model.eval()(torch.tensor([ids]), return_attention=True)
        return [tokenizer.decode([i]) for i in ids], torch.stack([w[0] for w in out.attentions])

    return attend


def encoder_attention(model, tokenizer) -> AttentionFn:
    """Attention weights of a `transformers` encoder loaded with attn_implementation="eager" (the default
    SDPA implementation returns no weights), with its special tokens [CLS] and [SEP]."""

    def attend(text: str) -> tuple[list[str], torch.Tensor]:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.eval()(**encoded, output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise ValueError('model returned no attention weights: load it with attn_implementation="eager"')
        return tokenizer.convert_ids_to_tokens(encoded["input_ids"][0]), torch.stack([a[0] for a in out.attentions])

    return attend


class ModelAttention(SnapshotMixin, widgets.VBox):
    def __init__(self, attention_fn: AttentionFn, prompt: str, layer: int = 0, head: int = 0) -> None:
        if not callable(attention_fn):
            raise TypeError("attention_fn must be a function text -> (tokens, weights (L, H, T, T))")
        self.attention_fn = attention_fn
        tokens, weights = self._attend(prompt)
        n_layer, n_head = weights.shape[:2]
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise ValueError(f"layer must be in [0, {n_layer}) and head in [0, {n_head}), got {layer}, {head}")
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout={"width": "520px"})  # fmt: skip
        self.layer = widgets.IntSlider(value=layer, min=0, max=n_layer - 1, description="layer")
        self.head = widgets.IntSlider(value=head, min=0, max=n_head - 1, description="head")
        self.query = widgets.IntSlider(value=len(tokens) - 1, min=0, max=len(tokens) - 1, description="query")
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.add_class("course-model-attention")
        self.prompt.observe(self._on_prompt, names="value")
        for control in (self.layer, self.head, self.query):
            control.add_class(f"course-model-{control.description}")
            control.observe(lambda _change: self.update(), names="value")
        super().__init__([self.prompt, widgets.HBox([self.layer, self.head, self.query]), self.image, self.table])
        self.tokens, self.weights = tokens, weights
        self.update()

    def _attend(self, text: str) -> tuple[list[str], torch.Tensor]:
        tokens, weights = self.attention_fn(text)
        if weights.dim() != 4 or weights.shape[2:] != (len(tokens), len(tokens)):
            raise ValueError(f"attention_fn must return weights (L, H, T, T) for T={len(tokens)} tokens")
        return tokens, weights.float()

    def _on_prompt(self, change: dict) -> None:
        self.tokens, self.weights = self._attend(change["new"])
        self.query.max = len(self.tokens) - 1
        self.query.value = len(self.tokens) - 1
        self.update()

    def head_weights(self) -> torch.Tensor:
        """(T, T) weights of the chosen layer and head."""
        return self.weights[self.layer.value, self.head.value]

    def update(self) -> None:
        row = self.head_weights()[self.query.value]
        query_token = visible_token(self.tokens[self.query.value])
        caption = f"layer {self.layer.value}, head {self.head.value}: where query {self.query.value} looks"
        keys = [visible_token(t) for t in self.tokens]
        cells = [[f"{w:.4f}" for w in row.tolist()]]
        self.table.value = html_table(cells, [query_token], keys, "course-model-weight", caption=caption)
        self.image.value = figure_to_png(self.figure())

    def figure(self) -> Figure:
        weights, labels = self.head_weights(), [visible_token(t) for t in self.tokens]
        size = min(0.25 * len(labels) + 1.8, 8)
        fig = Figure(figsize=(size + 1.0, size))
        ax = fig.add_subplot()
        image = ax.imshow(weights.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.axhline(self.query.value, color="tab:orange", linewidth=1)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(f"layer {self.layer.value}, head {self.head.value}")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="weight")
        return fig

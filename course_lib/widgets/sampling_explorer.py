"""The sampling explorer: type a prompt, set temperature, top-k and top-p, and see the distribution the next
token is drawn from (a bar chart and a table) and a sampled continuation.

The distribution is `course_lib.model.next_token_probs` applied to the model's logits for the prompt, and the
continuation is `GPT.generate` with the same settings, so the widget shows exactly what generation does.
"""

from __future__ import annotations

import html
from typing import Protocol

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from course_lib.model import GPT, next_token_probs
from course_lib.widgets.render import SnapshotMixin, figure_to_png, html_table, visible_token

SHOWN = 10  # tokens in the table and the chart


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SamplingExplorer(SnapshotMixin, widgets.VBox):
    def __init__(self, model: GPT, tokenizer: TextCodec, prompt: str = "", length: int = 120, seed: int = 0) -> None:
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a course_lib GPT, got {type(model).__name__}")
        if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
            raise TypeError("tokenizer must have encode(str) -> ids and decode(ids) -> str")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt = widgets.Textarea(value=prompt, description="prompt", rows=2, continuous_update=False)
        self.temperature = widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1, description="temperature")
        self.top_k = widgets.IntSlider(value=0, min=0, max=model.config.vocab_size, description="top-k (0 off)")
        self.top_p = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p")
        self.length = widgets.IntSlider(value=length, min=1, max=400, description="new tokens")
        self.seed = widgets.IntText(value=seed, description="seed", layout={"width": "160px"})
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.continuation = widgets.HTML()
        self.add_class("course-sampling-explorer")
        for control, css in ((self.temperature, "temperature"), (self.top_k, "top-k"), (self.top_p, "top-p")):
            control.add_class(f"course-sampling-{css}")
        for control in (self.prompt, self.temperature, self.top_k, self.top_p, self.length, self.seed):
            control.observe(lambda _change: self.update(), names="value")
        super().__init__([
            widgets.HBox([self.prompt, self.seed]),
            widgets.HBox([self.temperature, self.top_k, self.top_p, self.length]),
            widgets.HBox([self.image, self.table]),
            self.continuation,
        ])  # fmt: skip
        self.update()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self) -> torch.Tensor:
        ids = self.tokenizer.encode(self.prompt.value) or [0]
        return torch.tensor([ids[-self.model.config.block_size :]], device=self._device())

    def probs(self) -> torch.Tensor:
        """The next-token distribution for the prompt under the current settings."""
        with torch.no_grad():
            logits = self.model(self._ids()).logits[0, -1]
        top_k = self.top_k.value or None
        return next_token_probs(logits, self.temperature.value, top_k, self.top_p.value)

    def sample(self) -> str:
        """The continuation generate() draws with the current settings and seed."""
        generator = torch.Generator(self._device()).manual_seed(self.seed.value)  # generate() samples on that device
        settings = {"temperature": self.temperature.value, "top_k": self.top_k.value or None, "top_p": self.top_p.value}
        out = self.model.generate(self._ids(), self.length.value, generator=generator, **settings)
        return self.tokenizer.decode(out[0, self._ids().shape[1] :].tolist())

    def top(self) -> list[tuple[str, float]]:
        probs = self.probs()
        values, ids = probs.topk(SHOWN)
        return [(self.tokenizer.decode([i]), p) for i, p in zip(ids.tolist(), values.tolist(), strict=True)]

    def update(self) -> None:
        top = self.top()
        self.table.value = html_table([[f"{p:.4f}"] for _, p in top], [visible_token(t) for t, _ in top],
                                      ["probability"], "course-sampling-prob",
                                      caption=f"next token after the prompt, top {SHOWN}")  # fmt: skip
        self.image.value = figure_to_png(self.figure())
        text = self.sample()
        self.continuation.value = (
            '<pre class="course-sampling-text" style="white-space:pre-wrap;font-size:12px">'
            f"<b>{html.escape(self.prompt.value)}</b>{html.escape(text)}</pre>"
        )

    def figure(self) -> Figure:
        top = self.top()
        fig = Figure(figsize=(5.2, 3.0))
        ax = fig.add_subplot()
        ax.bar(range(len(top)), [p for _, p in top], color="#2b6cb0")
        ax.set_xticks(range(len(top)), [visible_token(t) for t, _ in top])
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.set_xlabel("next token (most likely first)")
        settings = f"T={self.temperature.value:g}, top-k={self.top_k.value or 'off'}, top-p={self.top_p.value:g}"
        ax.set_title(f"next-token distribution ({settings})", fontsize=10)
        return fig

"""The mask explorer: choose the sequence length, how much padding each sequence has and on which side,
switch the causal mask on or off; see the attention mask a sequence gets, and which query rows see no key.

The masks come from `course_lib.masks`, so what the widget shows is what the chapter's code builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from course_lib.masks import PADDING_SIDES, causal_mask, combine_masks, key_mask, token_mask_from_lengths
from course_lib.widgets.render import SnapshotMixin, figure_to_png, html_table

MIN_LEN = 2


class MaskExplorer(SnapshotMixin, widgets.VBox):
    """Masks for a batch built from `token_ids` (B, T_max): row b holds sequence b's tokens, of which the
    first `T - padding[b]` are used at sequence length T, placed on the chosen padding side."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        *,
        pad_id: int,
        vocab: Sequence[str] | None = None,
        padding: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.is_floating_point():
            raise ValueError("token_ids must be an integer tensor of shape (B, T_max)")
        batch, t_max = token_ids.shape
        if t_max < MIN_LEN:
            raise ValueError(f"token_ids must have at least {MIN_LEN} positions, got {t_max}")
        if padding is None:
            padding = [min(b, t_max - 1) for b in range(batch)]
        if len(padding) != batch or any(not 0 <= p < t_max for p in padding):
            raise ValueError(
                f"padding must give each of the {batch} sequences a count in [0, {t_max - 1}], got {padding}"
            )
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
            raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
        if (token_ids < 0).any():
            raise ValueError("token_ids must be >= 0")
        if vocab is not None and len(vocab) <= max(int(token_ids.max()), pad_id):
            raise ValueError(
                f"vocab must name every id in token_ids and pad_id (up to {max(int(token_ids.max()), pad_id)}), "
                f"got {len(vocab)} entries"
            )
        self.token_ids = token_ids.clone()
        self.pad_id = pad_id
        self.vocab = vocab

        self.seq_len = widgets.IntSlider(value=t_max, min=MIN_LEN, max=t_max, description="length T")
        self.padding = [
            widgets.IntSlider(value=p, min=0, max=t_max - 1, description=f"padding {b}") for b, p in enumerate(padding)
        ]
        self.side = widgets.ToggleButtons(options=PADDING_SIDES, value="right", description="pad side")
        self.causal = widgets.Checkbox(value=True, description="causal", indent=False)
        self.sequence = widgets.Dropdown(options=list(range(batch)), value=0, description="show seq")
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.tokens_view = widgets.HTML()
        self.add_class("course-mask-explorer")
        self.seq_len.add_class("course-mask-length")
        self.causal.add_class("course-mask-causal")
        for b, slider in enumerate(self.padding):
            slider.add_class(f"course-mask-padding-{b}")

        for control in (self.seq_len, self.side, self.causal, self.sequence, *self.padding):
            control.observe(lambda _change: self.update(), names="value")
        super().__init__(
            [
                widgets.HBox([self.seq_len, self.side, self.causal]),
                widgets.HBox([*self.padding, self.sequence]),
                widgets.HBox([self.image, self.table]),
                self.tokens_view,
            ]
        )
        self.update()

    def lengths(self) -> list[int]:
        """Real tokens per sequence at the current length: T minus its padding, at least 0."""
        return [max(self.seq_len.value - p.value, 0) for p in self.padding]

    def token_mask(self) -> torch.Tensor:
        """(B, T) True = real token, from the lengths and the padding side."""
        return token_mask_from_lengths(self.lengths(), max_len=self.seq_len.value, side=self.side.value)

    def input_ids(self) -> torch.Tensor:
        """(B, T) the padded batch: each sequence's first tokens where the token mask is True, pad elsewhere."""
        token_mask = self.token_mask()
        ids = torch.full(token_mask.shape, self.pad_id, dtype=self.token_ids.dtype)
        for b, length in enumerate(self.lengths()):
            ids[b, token_mask[b]] = self.token_ids[b, :length]
        return ids

    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) True = may attend: real keys only, and causal when switched on."""
        masks = [key_mask(self.token_mask())]
        if self.causal.value:
            masks.append(causal_mask(self.seq_len.value))
        return combine_masks(*masks).expand(-1, 1, self.seq_len.value, -1)

    def _name(self, token_id: int) -> str:
        return self.vocab[token_id] if self.vocab is not None else str(token_id)

    def update(self) -> None:
        """Redraw the mask picture, the 0/1 table of the shown sequence, and its tokens."""
        for slider in self.padding:
            slider.max = self.seq_len.value - 1
        b = self.sequence.value
        mask = self.attention_mask()[b, 0].int().tolist()
        t = self.seq_len.value
        empty = [r for r in range(t) if not any(mask[r])]
        caption = f"sequence {b}: 1 = may attend" + (f"; rows {empty} see no key" if empty else "")
        self.table.value = html_table(
            mask, [f"q{i}" for i in range(t)], [f"k{j}" for j in range(t)], "course-mask-cell", caption=caption
        )
        names = [self._name(i) for i in self.input_ids()[b].tolist()]
        self.tokens_view.value = html_table(
            [names], ["input"], [str(j) for j in range(t)], "course-mask-token", caption=f"sequence {b}'s tokens"
        )
        self.image.value = figure_to_png(self.figure())

    def figure(self) -> Figure:
        """The shown sequence's attention mask as a grid: also the static figure after the widget."""
        b = self.sequence.value
        mask = self.attention_mask()[b, 0]
        t = self.seq_len.value
        fig = Figure(figsize=(1.2 + 0.45 * t, 1.0 + 0.45 * t))
        ax = fig.add_subplot()
        ax.imshow(mask.int().numpy(), cmap=ListedColormap(["#eeeeee", "#2b6cb0"]), vmin=0, vmax=1)
        names = [self._name(i) for i in self.input_ids()[b].tolist()]
        ax.set_xticks(range(t), names, rotation=90)
        ax.set_yticks(range(t), names)
        ax.set_xticks([i - 0.5 for i in range(1, t)], minor=True)
        ax.set_yticks([i - 0.5 for i in range(1, t)], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("key (blue = may attend)")
        ax.set_ylabel("query")
        kind = "causal + padding" if self.causal.value else "padding only"
        ax.set_title(f"sequence {b}, {kind}, {self.side.value} padding")
        return fig

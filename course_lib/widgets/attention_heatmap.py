"""The attention heat-map widget: pick a query row, toggle the 1/√d_k scaling, edit a cell of Q, K or V,
and watch the weights and the output change.

Every number it shows is computed by `course_lib.attention.scaled_dot_product_attention`, so what a
learner sees in the widget is what the chapter's code computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from course_lib.attention import attention_scores, scaled_dot_product_attention
from course_lib.widgets.render import SnapshotMixin, figure_to_png, html_table

DIGITS = 4  # decimals shown in the tables


def _fmt(value: float) -> str:
    return f"{value:.{DIGITS}f}"


class AttentionHeatmap(SnapshotMixin, widgets.VBox):
    """Interactive softmax(QKᵀ/√d_k)V for one head: q (T_q, d_k), k (T_k, d_k), v (T_k, d_v)."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tokens: Sequence[str] | None = None,
    ) -> None:
        for name, value in (("q", q), ("k", k), ("v", v)):
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise ValueError(
                    f"{name} must be a 2-D tensor (T, d) for one head, got {getattr(value, 'shape', value)}"
                )
        self.matrices = {
            "Q": q.detach().double().clone(),
            "K": k.detach().double().clone(),
            "V": v.detach().double().clone(),
        }
        scaled_dot_product_attention(self.matrices["Q"], self.matrices["K"], self.matrices["V"])  # validates shapes
        t_q, t_k = q.shape[0], k.shape[0]
        if tokens is not None and len(tokens) != max(t_q, t_k):
            raise ValueError(f"tokens must name the {max(t_q, t_k)} positions, got {len(tokens)}")
        self.tokens = list(tokens) if tokens is not None else [str(i) for i in range(max(t_q, t_k))]

        self.query = widgets.IntSlider(value=0, min=0, max=t_q - 1, description="query row")
        self.scaled = widgets.Checkbox(value=True, description="divide by √d_k", indent=False)
        self.matrix = widgets.Dropdown(
            options=["Q", "K", "V"], value="Q", description="edit", layout={"width": "140px"}
        )
        self.row = widgets.Dropdown(description="row", layout={"width": "130px"})
        self.col = widgets.Dropdown(description="col", layout={"width": "130px"})
        self.value = widgets.FloatText(description="value", step=0.5, layout={"width": "180px"})
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        for control, css in ((self.query, "query-slider"), (self.scaled, "scale-toggle"), (self.value, "cell-value")):
            control.add_class(f"course-attention-{css}")
        self.add_class("course-attention-heatmap")

        self._syncing = False
        self._sync_cell_choices()
        self.query.observe(self._on_change, names="value")
        self.scaled.observe(self._on_change, names="value")
        for control in (self.matrix, self.row, self.col):
            control.observe(self._on_cell_choice, names="value")
        self.value.observe(self._on_value, names="value")
        controls = widgets.HBox([self.query, self.scaled])
        editor = widgets.HBox([self.matrix, self.row, self.col, self.value])
        super().__init__([controls, editor, widgets.HBox([self.image, self.table])])
        self.update()

    @property
    def scale(self) -> float:
        """1/√d_k when the scaling is on, 1 when it is off (the classic mistake, shown on request)."""
        return 1.0 / math.sqrt(self.matrices["Q"].shape[1]) if self.scaled.value else 1.0

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, weights) for the current Q, K, V and scaling."""
        return scaled_dot_product_attention(*self.matrices.values(), scale=self.scale)

    def _sync_cell_choices(self) -> None:
        """Offer the rows and columns of the chosen matrix and show that cell's value."""
        self._syncing = True
        rows, cols = self.matrices[self.matrix.value].shape
        row, col = self.row.value, self.col.value
        self.row.options, self.col.options = list(range(rows)), list(range(cols))
        self.row.value = row if row is not None and row < rows else 0
        self.col.value = col if col is not None and col < cols else 0
        self.value.value = float(self.matrices[self.matrix.value][self.row.value, self.col.value])
        self._syncing = False

    def _on_cell_choice(self, _change: dict) -> None:
        if not self._syncing:
            self._sync_cell_choices()

    def _on_value(self, change: dict) -> None:
        if self._syncing:
            return
        self.matrices[self.matrix.value][self.row.value, self.col.value] = float(change["new"])
        self.update()

    def _on_change(self, _change: dict) -> None:
        self.update()

    def update(self) -> None:
        """Recompute and redraw: the heat map and the numbers of the selected query row."""
        output, weights = self.compute()
        i = self.query.value
        t_k = weights.shape[1]
        keys = self.tokens[:t_k]
        scores = attention_scores(self.matrices["Q"], self.matrices["K"], scale=self.scale)
        rows = [
            (scores[i], keys, "course-score", f"scores of query {i}: q{i}·k × {self.scale:.4g}"),
            (weights[i], keys, "course-weight", f"weights of query {i}: softmax(scores), sum 1"),
            (
                output[i],
                [f"d{j}" for j in range(output.shape[1])],
                "course-output",
                f"output of query {i}: weights @ V",
            ),
        ]
        self.table.value = "".join(
            html_table([[_fmt(v) for v in values.tolist()]], [f"q{i}"], columns, css, caption=caption)
            for values, columns, css, caption in rows
        )
        self.image.value = figure_to_png(self.figure())

    def figure(self) -> Figure:
        """The heat map of the current weights, the selected query row outlined: also the static figure a
        notebook shows after the widget, so the page reads well where widgets do not run."""
        _, weights = self.compute()
        t_q, t_k = weights.shape
        fig = Figure(figsize=(1.0 + 0.7 * t_k, 0.8 + 0.6 * t_q))
        ax = fig.add_subplot()
        image = ax.imshow(weights.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(t_q):
            for c in range(t_k):
                color = "white" if weights[r, c] > 0.6 else "black"
                ax.text(c, r, f"{weights[r, c]:.2f}", ha="center", va="center", color=color, fontsize=9)
        i = self.query.value
        ax.add_patch(Rectangle((-0.5, i - 0.5), t_k, 1, fill=False, linewidth=2.5, edgecolor="tab:orange"))
        ax.set_xticks(range(t_k), self.tokens[:t_k])
        ax.set_yticks(range(t_q), [f"q{r}" for r in range(t_q)])
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        scaling = "QKᵀ/√d_k" if self.scaled.value else "QKᵀ (unscaled)"
        ax.set_title(f"softmax({scaling})")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="weight")
        return fig

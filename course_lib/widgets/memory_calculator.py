"""The memory calculator: pick a model, a batch, a precision recipe, an optimizer, activation checkpointing or
inference, a ZeRO stage and the data / tensor / pipeline degrees, and see the bytes on one device, by component,
against a GPU's memory, in GiB (2³⁰ bytes): GPU memory is sized in binary units (an A100 sold as "80 GB" holds
80 GiB), so the GPU sizes offered are GiB.

Every number is `course_lib.memory.per_device_memory`, the formulas chapter 08 checks against measurements, so
the widget shows exactly what the chapter proved (and, for settings no laptop can run, what it predicts). The
same assumptions hold: tensor parallelism divides every activation by tp, as Megatron's sequence parallelism
does (without it the LayerNorm inputs, outputs and statistics stay whole on each rank), and the loss's B·T·V
log-softmax, the block being recomputed under checkpointing, temporary buffers and fragmentation are not counted.
The widget says so under its table (`ASSUMPTIONS`).
"""

from __future__ import annotations

import html

import ipywidgets as widgets
from matplotlib.figure import Figure

from course_lib.memory import RECIPES, GiB, MemoryBreakdown, ModelShape, Parallelism, per_device_memory
from course_lib.widgets.render import SnapshotMixin, figure_to_png, html_table

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "kv_cache")
COLORS = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c")
GPU_MEMORY_GIB = (24, 40, 80)  # GiB, as GPUs report it (an A100 "80 GB" reports 81,920 MiB)
ASSUMPTIONS = (
    "tensor ∥ divides every activation by tp (Megatron with sequence parallelism). Not counted: the "
    "loss's B·T·V log-softmax, the block recomputed under checkpointing, temporary buffers, fragmentation."
)

PRESETS = {
    "GPT-2 small (124M)": ModelShape("GPT-2 small", n_layer=12, d_model=768, n_head=12, vocab_size=50257,
                                     context=1024),
    "GPT-2 XL (1.5B)": ModelShape("GPT-2 XL", n_layer=48, d_model=1600, n_head=25, vocab_size=50257, context=1024),
    "LLaMA-2 7B": ModelShape("LLaMA-2 7B", n_layer=32, d_model=4096, n_head=32, vocab_size=32000, context=4096,
                             d_ff=11008, mlp="swiglu", tied=False),
    "LLaMA-2 70B": ModelShape("LLaMA-2 70B", n_layer=80, d_model=8192, n_head=64, vocab_size=32000, context=4096,
                              n_kv_head=8, d_ff=28672, mlp="swiglu", tied=False),
    "GPT-3 175B": ModelShape("GPT-3 175B", n_layer=96, d_model=12288, n_head=96, vocab_size=50257, context=2048),
}  # fmt: skip


class MemoryCalculator(SnapshotMixin, widgets.VBox):
    def __init__(self, presets: dict[str, ModelShape] | None = None, model: str | None = None, seq: int = 1024,
                 batch: int = 1, precision: str = "mixed", gpu_gib: int = 80) -> None:  # fmt: skip
        self.presets = PRESETS if presets is None else presets
        if not self.presets or not all(isinstance(s, ModelShape) for s in self.presets.values()):
            raise TypeError("presets must map names to course_lib.memory.ModelShape")
        model = next(iter(self.presets)) if model is None else model
        if model not in self.presets:
            raise ValueError(f"model must be one of {list(self.presets)}, got {model!r}")
        if precision not in RECIPES:
            raise ValueError(f"precision must be one of {list(RECIPES)}, got {precision!r}")
        if gpu_gib not in GPU_MEMORY_GIB:
            raise ValueError(f"gpu_gib must be one of {GPU_MEMORY_GIB}, got {gpu_gib!r}")
        self.model = widgets.Dropdown(options=list(self.presets), value=model, description="model")
        self.seq = widgets.IntSlider(value=seq, min=1, max=self.presets[model].context, description="sequence")
        self.batch = widgets.IntSlider(value=batch, min=1, max=64, description="micro-batch")
        self.precision = widgets.Dropdown(options=[(r.name, k) for k, r in RECIPES.items()], value=precision,
                                          description="precision")  # fmt: skip
        self.optimizer = widgets.Dropdown(options=["adam", "sgd_momentum", "sgd"], description="optimizer")
        self.checkpointing = widgets.Checkbox(value=False, description="activation checkpointing")
        self.inference = widgets.Checkbox(value=False, description="inference (weights + KV cache)")
        self.zero = widgets.IntSlider(value=0, min=0, max=3, description="ZeRO stage")
        self.dp = widgets.IntSlider(value=1, min=1, max=64, description="data ∥")
        self.tp = widgets.IntSlider(value=1, min=1, max=8, description="tensor ∥")
        self.pp = widgets.IntSlider(value=1, min=1, max=16, description="pipeline ∥")
        self.gpu = widgets.Dropdown(options=[(f"{g} GiB", g) for g in GPU_MEMORY_GIB], value=gpu_gib, description="GPU")
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.verdict = widgets.HTML()
        self.notes = widgets.HTML(f'<p class="course-memory-notes" style="font-size:0.85em;max-width:28em">'
                                  f"{html.escape(ASSUMPTIONS)}</p>")  # fmt: skip
        self.add_class("course-memory-calculator")
        for control, css in ((self.seq, "seq"), (self.batch, "batch"), (self.zero, "zero"), (self.dp, "dp"),
                             (self.tp, "tp"), (self.pp, "pp")):  # fmt: skip
            control.add_class(f"course-memory-{css}")
        self.model.observe(self._model_changed, names="value")
        for control in (self.seq, self.batch, self.precision, self.optimizer, self.checkpointing, self.inference,
                        self.zero, self.dp, self.tp, self.pp, self.gpu):  # fmt: skip
            control.observe(lambda _change: self.update(), names="value")
        super().__init__([
            widgets.HBox([self.model, self.precision, self.optimizer, self.gpu]),
            widgets.HBox([self.seq, self.batch, self.checkpointing, self.inference]),
            widgets.HBox([self.zero, self.dp, self.tp, self.pp]),
            widgets.HBox([self.image, widgets.VBox([self.table, self.verdict, self.notes])]),
        ])  # fmt: skip
        self.update()

    def _model_changed(self, _change) -> None:
        context = self.presets[self.model.value].context
        self.seq.value = min(self.seq.value, context)  # observed: updates unless it is unchanged
        self.seq.max = context
        self.update()

    @property
    def shape(self) -> ModelShape:
        return self.presets[self.model.value]

    def breakdown(self, zero_stage: int | None = None) -> MemoryBreakdown:
        """Bytes per device for the current settings (or for another ZeRO stage). Raises ValueError for settings
        that cannot be (tp not dividing the heads, more stages than layers)."""
        parallel = Parallelism(self.dp.value, self.tp.value, self.pp.value,
                               self.zero.value if zero_stage is None else zero_stage)  # fmt: skip
        return per_device_memory(self.shape, self.batch.value, self.seq.value, RECIPES[self.precision.value],
                                 self.optimizer.value, self.checkpointing.value, parallel,
                                 self.inference.value)  # fmt: skip

    def update(self) -> None:
        try:
            memory = self.breakdown()
        except ValueError as error:
            self.table.value = ""
            self.image.value = b""
            self.verdict.value = f'<p class="course-memory-error" style="color:#c53030">{html.escape(str(error))}</p>'
            return
        rows = [[f"{getattr(memory, c) / GiB:.3f}"] for c in COMPONENTS] + [[f"{memory.total / GiB:.3f}"]]
        devices = Parallelism(self.dp.value, self.tp.value, self.pp.value).devices
        caption = f"{self.shape.name}: {self.shape.n_params / 1e9:.3g} B parameters, {devices} devices"
        self.table.value = html_table(rows, [*COMPONENTS, "total"], ["GiB per device"], "course-memory-gib", caption)
        share = memory.total / (self.gpu.value * GiB)
        color, word = ("#2f855a", "fits") if share <= 1 else ("#c53030", "does not fit")
        self.verdict.value = (f'<p class="course-memory-verdict" style="color:{color};font-weight:bold">'
                              f"{word} in {self.gpu.value} GiB ({share:.0%} of it)</p>")  # fmt: skip
        self.image.value = figure_to_png(self.figure())

    def figure(self) -> Figure:
        """Stacked bars: bytes per device at every ZeRO stage for the current settings, the chosen one marked,
        and the GPU's memory as a line."""
        fig = Figure(figsize=(6.4, 3.2))
        ax = fig.add_subplot()
        stages = [self.breakdown(stage) for stage in range(4)]
        bottom = [0.0] * 4
        for component, color in zip(COMPONENTS, COLORS, strict=True):
            heights = [getattr(m, component) / GiB for m in stages]
            ax.bar(range(4), heights, bottom=bottom, color=color, label=component.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.axhline(self.gpu.value, color="black", linestyle="--", linewidth=1, label=f"{self.gpu.value} GiB GPU")
        labels = [f"ZeRO {s}" + (" ◀" if s == self.zero.value else "") for s in range(4)]
        ax.set_xticks(range(4), labels)
        ax.set_ylabel("GiB per device")
        ax.set_title(f"{self.shape.name}, dp={self.dp.value} tp={self.tp.value} pp={self.pp.value}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig

"""Interactive ipywidgets for the chapters. Each returns an ipywidgets object whose numbers come from
course_lib, and has `figure()` and `snapshot()` for the static picture shown after it."""

from course_lib.widgets.attention_heatmap import AttentionHeatmap
from course_lib.widgets.mask_explorer import MaskExplorer
from course_lib.widgets.memory_calculator import MemoryCalculator
from course_lib.widgets.model_attention import ModelAttention, encoder_attention, gpt_attention
from course_lib.widgets.sampling_explorer import SamplingExplorer

__all__ = ["AttentionHeatmap", "MaskExplorer", "MemoryCalculator", "ModelAttention", "SamplingExplorer",
           "encoder_attention", "gpt_attention"]  # fmt: skip

"""Interactive ipywidgets for the chapters. Each takes plain tensors and returns an ipywidgets object whose
numbers come from course_lib, and has a `figure()` for the static picture shown after it."""

from course_lib.widgets.attention_heatmap import AttentionHeatmap
from course_lib.widgets.mask_explorer import MaskExplorer

__all__ = ["AttentionHeatmap", "MaskExplorer"]

"""progress(): tqdm's progress bar, which in a notebook also leaves its finished state in the saved file.

In a notebook a bar is a widget, and the text a saved notebook keeps for a widget is taken when it is first
displayed: every stored bar would read "0%". This bar is displayed under a display id and displayed again
under the same id when it closes, so the saved text is the finished bar (steps, time, rate). Outside a
notebook it is plain tqdm.
"""

from __future__ import annotations

from typing import Any

from IPython.display import display
from tqdm.auto import tqdm as auto_tqdm
from tqdm.notebook import tqdm as notebook_tqdm


class NotebookBar(notebook_tqdm):
    """A notebook bar whose stored text is its final state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, display=False, **kwargs)
        self._handle = None if self.disable else display(self.container, display_id=True)

    def close(self) -> None:
        super().close()
        if self._handle is not None:
            self._handle.update(self.container)
            self._handle = None


IN_NOTEBOOK = issubclass(auto_tqdm, notebook_tqdm)  # tqdm.auto picked its widget bar: we run in a kernel


def progress(*args: Any, **kwargs: Any) -> auto_tqdm:
    """tqdm(...) with the same arguments; redraws at most once a second unless told otherwise, so a long run
    sends the notebook a few hundred updates, not thousands."""
    kwargs.setdefault("mininterval", 1.0)
    return (NotebookBar if IN_NOTEBOOK else auto_tqdm)(*args, **kwargs)

import io

from tqdm.std import tqdm as std_tqdm

from course_lib import progress as progress_module
from course_lib.progress import progress


def test_outside_a_notebook_it_is_plain_tqdm_redrawing_once_a_second():
    bar = progress(range(3), file=io.StringIO())
    assert isinstance(bar, std_tqdm) and not isinstance(bar, progress_module.NotebookBar)
    assert list(bar) == [0, 1, 2] and bar.mininterval == 1.0


def test_in_a_notebook_the_bar_is_displayed_again_when_it_closes(monkeypatch):
    """The saved text of a widget is taken at each display: showing the bar again at the end stores its end."""
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(repr(obj))

    monkeypatch.setattr(progress_module, "IN_NOTEBOOK", True)
    monkeypatch.setattr(progress_module, "display", lambda obj, display_id: shown.append(repr(obj)) or Handle())
    for _ in progress(range(4), desc="work"):
        pass
    assert shown[0].startswith("work:   0%") and shown[-1].startswith("work: 100%") and "4/4" in shown[-1]

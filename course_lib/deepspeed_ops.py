"""Compile DeepSpeed's CPU communication op once, at `make setup`, so that no notebook or test pays for it.

DeepSpeed JIT-compiles C++ ops the first time a process needs them and caches the result under
TORCH_EXTENSIONS_DIR (the project's ignored `.torch_extensions/`, set by the Makefile and by course_lib.launch).
On CPU the first `deepspeed.init_distributed` builds the shared-memory all-reduce op; the course uses torch's
AdamW ("torch_adam"), so no optimizer op is needed. Run: `python -m course_lib.deepspeed_ops`.
"""

from __future__ import annotations

import os
import time

from course_lib.launch import EXTENSIONS_DIR, deepspeed_accelerator


def prewarm() -> float:
    """Build (or find cached) the ops the course uses; returns the seconds it took."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    os.environ.setdefault("DS_ACCELERATOR", deepspeed_accelerator())  # said, so DeepSpeed does not guess and warn
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    start = time.perf_counter()
    ShareMemCommBuilder().load(verbose=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    seconds = prewarm()
    print(f"DeepSpeed's shared-memory comm op ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({seconds:.1f} s)")

"""Distributed entry points, one idea a file, each run as `torchrun -m course_lib.parallel.<name>` (from a
notebook through `course_lib.launch.launch`). They share set-up and teardown in `common`."""

"""Each distributed entry point, run for real as 2 gloo processes, equals the single-process computation."""

import torch

from course_lib.launch import launch
from course_lib.parallel.ring_allreduce import rank_tensor


def test_ring_allreduce_sums_like_one_process_and_sends_2_n_minus_1_over_n_of_the_tensor():
    sizes = [10, 1000]
    results = launch("course_lib.parallel.ring_allreduce", ["--sizes", *sizes, "--repeats", "1"], nproc=2,
                     show_output=False)  # fmt: skip
    expected = rank_tensor(0, 10) + rank_tensor(1, 10)
    for result in results:
        assert torch.equal(torch.tensor(result["first_result"]), expected)
        assert result["bytes_sent"] == [2 * (2 - 1) / 2 * 4 * size for size in sizes]
        assert result["max_error_vs_all_reduce"] == [0.0, 0.0]


def test_reduce_scatter_alone_is_not_an_all_reduce():
    results = launch("course_lib.parallel.ring_allreduce", ["--sizes", "10", "--repeats", "1", "--no-allgather"],
                     nproc=2, show_output=False)  # fmt: skip
    expected = rank_tensor(0, 10) + rank_tensor(1, 10)
    for rank, result in enumerate(results):
        got = torch.tensor(result["first_result"])
        finished = (rank + 1) % 2  # after reduce-scatter rank r holds the sum of chunk r+1 only
        assert torch.equal(got.chunk(2)[finished], expected.chunk(2)[finished])
        assert not torch.equal(got, expected)

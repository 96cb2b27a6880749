"""Each distributed entry point, run for real as 2 gloo processes, equals the single-process computation."""

import warnings

import pytest
import torch

from course_lib.launch import launch
from course_lib.parallel import ddp, expert, pipeline, tensor_parallel
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


def ddp_weights(extra, tmp_path):
    results = launch("course_lib.parallel.ddp", ["--steps", "4", "--dtype", "float64", *extra], nproc=2,
                     result_dir=tmp_path, show_output=False)  # fmt: skip
    return results, [torch.load(r["weights"]) for r in results]


def test_ddp_on_two_ranks_trains_to_the_single_process_weights(tmp_path):
    results, (rank0, rank1) = ddp_weights(["--bucket-mb", "0.1", "--profile"], tmp_path)
    reference, losses = ddp.single_process_run(ddp.parser().parse_args(["--steps", "4", "--dtype", "float64"]))
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(rank0[name], expected, atol=1e-10, rtol=0)
        assert torch.equal(rank0[name], rank1[name])
    mean_loss = [(a + b) / 2 for a, b in zip(results[0]["local_loss"], results[1]["local_loss"], strict=True)]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(losses), atol=1e-12, rtol=0)
    buckets = results[0]["buckets"]
    n_params = len(list(reference.parameters()))
    assert buckets["ready_order"] == list(reversed(range(n_params)))  # the last layer's gradients come first
    assert [i for bucket in buckets["params"] for i in bucket] == buckets["ready_order"]
    assert sum(buckets["bytes"]) == 8 * sum(p.numel() for p in reference.parameters())
    assert buckets["cap_bytes"] == int(0.1 * 2**20) and len(buckets["params"]) == buckets["reduced"] > 1
    kinds = [e["kind"] for e in results[0]["trace"]]
    assert kinds.count("all_reduce") == kinds.count("launch") == buckets["reduced"]


def test_profiler_events_are_sorted_into_backward_ops_launches_and_all_reduces():
    assert ddp.event_kind("autograd::engine::evaluate_function: MmBackward0") == "backward"
    assert ddp.event_kind("c10d::allreduce_") == "launch"
    assert ddp.event_kind("gloo:all_reduce") == ddp.event_kind("nccl:all_reduce") == "all_reduce"
    assert ddp.event_kind("aten::mm") is None


def test_sgd_trains_like_one_process_and_summed_gradients_make_its_first_step_twice_as_large(tmp_path):
    sgd = ["--optimizer", "sgd"]
    averaged, (weights, _) = ddp_weights(sgd, tmp_path / "averaged")
    summed, (wrong, _) = ddp_weights([*sgd, "--sum-gradients"], tmp_path / "summed")
    args = ddp.parser(controls=True).parse_args(["--steps", "4", "--dtype", "float64", *sgd])
    reference, _ = ddp.single_process_run(args, "sgd")
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(weights[name], expected, atol=1e-10, rtol=0)
    assert not torch.allclose(wrong["lm_head.weight"], reference.lm_head.weight.detach(), atol=1e-6)
    assert summed[0]["grad_norm"][0] == pytest.approx(2 * averaged[0]["grad_norm"][0], rel=1e-12)


def test_sgd_config_steps_by_exactly_lr_times_the_gradient():
    args = ddp.parser(controls=True).parse_args(["--sgd-lr", "0.25"])
    config = ddp.train_config(args, "sgd")
    assert (config.lr, config.weight_decay, config.grad_clip) == (0.25, 0.0, None)
    assert isinstance(ddp.make_optimizer(torch.nn.Linear(2, 2), config, "sgd"), torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ddp.train_config(args, "adam")


def test_without_the_all_reduce_the_ranks_drift_apart(tmp_path):
    _, (rank0, rank1) = ddp_weights(["--no-sync"], tmp_path)
    assert any(not torch.allclose(rank0[name], rank1[name], atol=1e-6) for name in rank0)


def test_the_sampler_deals_each_global_batch_to_the_ranks():
    args = ddp.parser().parse_args(["--steps", "3", "--batch", "4"])
    x, y, _ = ddp.dataset(args)
    whole = list(ddp.shard_batches(x, y, args, 0, 1))
    shards = [list(ddp.shard_batches(x, y, args, rank, 2)) for rank in range(2)]
    for step, (bx, _) in enumerate(whole):
        together = torch.cat([shards[0][step][0], shards[1][step][0]])
        assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, bx.tolist()))
    with pytest.raises(ValueError, match="--batch 4 must be divisible by the number of ranks 3"):
        next(ddp.shard_batches(x, y, args, 0, 3))


def tensor_parallel_run(extra, tmp_path):
    results = launch("course_lib.parallel.tensor_parallel", extra, nproc=2, result_dir=tmp_path, show_output=False)
    return results, [torch.load(r["tensors"]) for r in results]


@pytest.mark.parametrize("mode", ["explicit", "dtensor"])
def test_tensor_parallel_mlp_and_attention_equal_the_unsplit_block(mode, tmp_path):
    results, shards = tensor_parallel_run(["--mode", mode], tmp_path)
    expected = tensor_parallel.reference_gradients(tensor_parallel.parser().parse_args([]))
    for name in ("mlp", "attn"):
        for rank in range(2):
            torch.testing.assert_close(shards[rank][f"{name}.out"], expected[f"{name}.out"], atol=1e-12, rtol=0)
            torch.testing.assert_close(shards[rank][f"{name}.x_grad"], expected[f"{name}.x_grad"], atol=1e-12, rtol=0)
    # column-parallel weights are split by output rows, row-parallel ones by input columns
    joined = torch.cat([shards[0]["mlp.fc.weight.grad"], shards[1]["mlp.fc.weight.grad"]], dim=0)
    torch.testing.assert_close(joined, expected["mlp.fc.weight.grad"], atol=1e-12, rtol=0)
    joined = torch.cat([shards[0]["mlp.proj.weight.grad"], shards[1]["mlp.proj.weight.grad"]], dim=1)
    torch.testing.assert_close(joined, expected["mlp.proj.weight.grad"], atol=1e-12, rtol=0)
    if mode == "explicit":
        one_activation = 2 * 8 * 32 * 8  # batch x seq x width x 8 bytes
        assert results[0]["mlp"]["all_reduces"] == [{"where": "forward", "bytes": one_activation},
                                                    {"where": "backward", "bytes": one_activation}]  # fmt: skip
    else:
        assert results[0]["mlp"]["total_comms"] == {"c10d_functional.all_reduce": 2}
        assert results[0]["attn"]["total_comms"] == {"c10d_functional.all_reduce": 4}  # q, k, v each in backward


def test_tensor_parallel_with_the_wrong_shard_is_wrong(tmp_path):
    _, shards = tensor_parallel_run(["--wrong-shard"], tmp_path)
    expected = tensor_parallel.reference_gradients(tensor_parallel.parser().parse_args([]))
    assert not torch.allclose(shards[0]["mlp.out"], expected["mlp.out"], atol=1e-6)


def test_f_without_its_all_reduce_keeps_the_outputs_but_leaves_each_rank_a_share_of_the_input_gradient(tmp_path):
    results, shards = tensor_parallel_run(["--f-without-all-reduce"], tmp_path)
    expected = tensor_parallel.reference_gradients(tensor_parallel.parser().parse_args([]))
    for name in ("mlp", "attn"):
        torch.testing.assert_close(shards[0][f"{name}.out"], expected[f"{name}.out"], atol=1e-12, rtol=0)
        assert not torch.allclose(shards[0][f"{name}.x_grad"], expected[f"{name}.x_grad"], atol=1e-6)
        together = shards[0][f"{name}.x_grad"] + shards[1][f"{name}.x_grad"]  # what the missing all-reduce adds up
        torch.testing.assert_close(together, expected[f"{name}.x_grad"], atol=1e-12, rtol=0)
        assert [c["where"] for c in results[0][name]["all_reduces"]] == ["forward"]
    joined = torch.cat([shards[0]["mlp.fc.weight.grad"], shards[1]["mlp.fc.weight.grad"]], dim=0)
    torch.testing.assert_close(joined, expected["mlp.fc.weight.grad"], atol=1e-12, rtol=0)  # this layer's are right


def pipeline_run(extra, tmp_path):
    results = launch("course_lib.parallel.pipeline", extra, nproc=2, result_dir=tmp_path, show_output=False)
    weights = {}
    for result in results:
        weights |= torch.load(result["weights"])
    return results, weights


@pytest.mark.parametrize(
    "schedule, orders, in_flight",
    [
        ("gpipe", [["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]] * 2, [4, 4]),
        ("1f1b", [["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"], ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]],
         [2, 1]),
    ],
)  # fmt: skip
def test_pipeline_schedules_run_in_their_order_and_train_like_the_unsplit_model(schedule, orders, in_flight, tmp_path):
    results, weights = pipeline_run(["--schedule", schedule, "--microbatches", "4"], tmp_path)
    args = pipeline.parser().parse_args([])
    reference, losses = pipeline.single_process_run(args)
    assert weights.keys() == dict(reference.named_parameters()).keys()
    for name, expected in reference.named_parameters():
        torch.testing.assert_close(weights[name], expected.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.tensor(results[1]["losses"]), torch.tensor(losses), atol=1e-12, rtol=0)
    assert [[f"{e[0]}{e[1]}" for e in r["steps"][-1]["events"]] for r in results] == orders
    assert [r["max_in_flight"] for r in results] == in_flight


def test_a_pipeline_of_one_stage_is_first_and_last_and_trains_like_the_unsplit_model(tmp_path):
    results = launch("course_lib.parallel.pipeline", [], nproc=1, result_dir=tmp_path, show_output=False)
    reference, losses = pipeline.single_process_run(pipeline.parser().parse_args([]))
    weights = torch.load(results[0]["weights"])
    for name, expected in reference.named_parameters():
        torch.testing.assert_close(weights[name], expected.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(losses), atol=1e-12, rtol=0)


def test_a_pipeline_that_sums_micro_batch_gradients_trains_differently(tmp_path):
    _, weights = pipeline_run(["--no-grad-scaling"], tmp_path)
    reference, _ = pipeline.single_process_run(pipeline.parser().parse_args([]))
    assert not torch.allclose(weights["lm_head.weight"], reference.lm_head.weight.detach(), atol=1e-6)


def zero_run(mode, extra, tmp_path):
    return launch("course_lib.parallel.zero", ["--mode", mode, "--steps", "4", "--dtype", "float64", *extra], nproc=2,
                  result_dir=tmp_path, show_output=False)  # fmt: skip


def test_fsdp_shards_every_state_trains_like_one_process_and_its_checkpoint_loads_on_one(tmp_path):
    import torch.distributed.checkpoint as dcp

    results = zero_run("fsdp", ["--checkpoint"], tmp_path)
    args = ddp.parser().parse_args(["--steps", "4", "--dtype", "float64"])
    reference, _ = ddp.single_process_run(args)
    final = torch.load(results[0]["weights"])
    for name, expected in reference.named_parameters():
        torch.testing.assert_close(final[name], expected.detach(), atol=1e-10, rtol=0)
    for result in results:  # rank 0's shards are the larger ones when a dimension does not split evenly
        padded = sum(-(-p.shape[0] // 2) * p[0].numel() for p in reference.parameters())
        assert result["held_bytes"]["parameters"] == result["held_bytes"]["gradients"] == 8 * padded
        assert result["held_bytes"]["optimizer"] == 16 * sum(result["local_numel"]) + 4 * len(result["local_numel"])
        # blocks are all-gathered in forward and again in backward, the root (embeddings, final norm) once
        root = sum(-(-p.shape[0] // 2) * 2 * p[0].numel() for n, p in reference.named_parameters() if "blocks" not in n)
        assert volumes(result) == {"_allgather_base_": 2 * padded * 2 - root, "_reduce_scatter_base_": 2 * padded}
    fresh = ddp.build(args, reference.config.vocab_size)
    state = fresh.state_dict()
    with warnings.catch_warnings():  # DCP notes there is no process group: loading on one process is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=results[0]["checkpoint"])
    fresh.load_state_dict(state)
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], expected, atol=1e-10, rtol=0)


def volumes(result) -> dict[str, int]:
    """Elements of the full tensors a rank's collectives moved in its counted step, by collective."""
    found = {}
    for call in result["collectives"]:
        found[call["op"]] = found.get(call["op"], 0) + call["elements"]
    return found


def test_zero1_keeps_optimizer_state_only_for_the_parameters_a_rank_owns(tmp_path):
    results = zero_run("zero1", [], tmp_path)
    assert sum(r["owned_numel"] for r in results) == results[0]["n_params"]
    assert sorted(results[0]["owned"] + results[1]["owned"]) == list(range(19))  # each tensor owned exactly once
    for result in results:
        assert result["held_bytes"]["parameters"] == result["held_bytes"]["gradients"] == 8 * result["n_params"]
        assert result["held_bytes"]["optimizer"] == 16 * result["owned_numel"] + 4 * result["owned_tensors"]
        # DDP's all-reduce of every gradient, then each owner broadcasts the parameters it updated
        assert volumes(result) == {"allreduce_": result["n_params"], "broadcast_": result["n_params"]}


def test_zero1_whose_owners_do_not_broadcast_trains_differently(tmp_path):
    results = zero_run("zero1", ["--skip-sync"], tmp_path)
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(["--steps", "4", "--dtype", "float64"]))
    assert all("broadcast_" not in volumes(r) for r in results)
    final = torch.load(results[0]["weights"])
    assert not torch.allclose(torch.cat([final[n].flatten() for n, _ in reference.named_parameters()]),
                              torch.cat([p.detach().flatten() for p in reference.parameters()]), atol=1e-6)


def test_fsdp_that_sums_the_gradients_trains_sgd_differently(tmp_path):
    results = zero_run("fsdp", ["--optimizer", "sgd", "--sum-gradients"], tmp_path)
    args = ddp.parser(controls=True).parse_args(["--steps", "4", "--dtype", "float64", "--optimizer", "sgd"])
    reference, _ = ddp.single_process_run(args, "sgd")
    final = torch.load(results[0]["weights"])
    assert not torch.allclose(final["blocks.0.mlp.fc.weight"], reference.blocks[0].mlp.fc.weight.detach(), atol=1e-6)


def test_fsdp_whose_ranks_read_the_same_shard_trains_differently(tmp_path):
    results = zero_run("fsdp", ["--same-shard"], tmp_path)
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(["--steps", "4", "--dtype", "float64"]))
    final = torch.load(results[0]["weights"])
    assert not torch.allclose(final["blocks.0.mlp.fc.weight"], reference.blocks[0].mlp.fc.weight.detach(), atol=1e-6)


def expert_run(extra, tmp_path):
    results = launch("course_lib.parallel.expert", extra, nproc=2, result_dir=tmp_path, show_output=False)
    return results, [torch.load(r["tensors"]) for r in results]


def test_experts_on_two_ranks_give_the_single_process_outputs_and_gradients(tmp_path):
    results, tensors = expert_run(["--seed", "1"], tmp_path)
    args = expert.parser().parse_args(["--seed", "1"])
    out, grads = expert.reference_run(args, 2)
    for rank, (result, mine) in enumerate(zip(results, tensors, strict=True)):
        rows = slice(rank * args.tokens, (rank + 1) * args.tokens)
        torch.testing.assert_close(mine["out"], out[rows], atol=1e-12, rtol=0)
        torch.testing.assert_close(mine["tokens"], grads["tokens"][rows], atol=1e-12, rtol=0)
        assert result["experts"] == [2 * rank, 2 * rank + 1]
        held = {name.split(".")[1] for name in mine if name.startswith("experts.")}
        assert held == {str(2 * rank), str(2 * rank + 1)}
        for name, grad in mine.items():
            if name not in ("out", "tokens"):
                torch.testing.assert_close(grad, grads[name], atol=1e-12, rtol=0)
    expert_params = sum(p.numel() for p in expert.build(args).experts["0"].parameters())
    assert results[0]["parameters"] == args.width * args.experts + 2 * expert_params  # router + its two experts
    sent = torch.tensor([r["tokens_per_expert_sent"] for r in results])
    received = [r["tokens_received"] for r in results]
    assert received == [sent[:, 0:2].flatten().tolist(), sent[:, 2:4].flatten().tolist()]


def test_all_to_all_bytes_are_measured_at_the_collective_forward_and_backward(tmp_path):
    results, _ = expert_run(["--seed", "1"], tmp_path)  # seed 1: the ranks send 17 and 13 tokens away
    width, sent = expert.parser().parse_args([]).width, [r["tokens_per_expert_sent"] for r in results]
    remote = [sum(sent[0][2:]), sum(sent[1][:2])]  # my tokens for the other rank's experts
    assert remote[0] != remote[1] and [r["remote_tokens"] for r in results] == remote
    for rank, result in enumerate(results):
        inbound = remote[1 - rank]  # the other rank's tokens for my experts, whose results I send back
        measured = result["measured_bytes_sent"]
        counts, dispatch, combine = measured["forward"]
        assert counts == 2 * 8  # the other rank's two experts' counts, int64, in equal parts (no split sizes given)
        assert (dispatch, combine) == (remote[rank] * width * 8, inbound * width * 8)
        assert sorted(measured["backward"]) == sorted([dispatch, combine])  # each exchange reversed for gradients


def test_experts_results_left_in_expert_order_are_wrong(tmp_path):
    _, tensors = expert_run(["--control"], tmp_path)
    args = expert.parser().parse_args([])
    out, _ = expert.reference_run(args, 2)
    torch.testing.assert_close(tensors[0]["out"], out[: args.tokens], atol=1e-12, rtol=0)
    assert not torch.allclose(tensors[0]["out_unsorted"], out[: args.tokens], atol=1e-6)


def elastic_run(extra, tmp_path):
    args = ["--steps", "8", "--dtype", "float64", "--checkpoint-dir", tmp_path, "--checkpoint-every", "3",
            "--kill-rank", "1", "--kill-at-step", "5", *extra]  # fmt: skip
    results = launch("course_lib.parallel.elastic", args, nproc=2, max_restarts=1, result_dir=tmp_path,
                     show_output=False)  # fmt: skip
    return results, torch.load(results[0]["weights"])


def test_a_lost_rank_is_restarted_and_the_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    results, weights = elastic_run([], tmp_path)
    assert [(r["attempt"], r["started_at"], r["steps_run"]) for r in results] == [(1, 3, 5)] * 2
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(["--steps", "8", "--dtype", "float64"]))
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(weights[name], expected, atol=1e-10, rtol=0)


def test_resuming_without_the_data_position_trains_differently(tmp_path):
    _, weights = elastic_run(["--forget-data-position"], tmp_path)
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(["--steps", "8", "--dtype", "float64"]))
    assert not torch.allclose(weights["lm_head.weight"], reference.lm_head.weight.detach(), atol=1e-6)


def test_idle_fractions_measure_each_stage_against_the_whole_step():
    stage0 = {"start": 0.0, "end": 3.0, "events": [("F", 0, 0.0, 1.0), ("B", 0, 2.0, 3.0)]}  # busy 2 of 4
    stage1 = {"start": 1.0, "end": 4.0, "events": [("F", 0, 1.0, 2.0), ("B", 0, 2.0, 4.0)]}  # busy 3 of 4
    idle, span = pipeline.idle_fractions([{"steps": [{}, stage0]}, {"steps": [{}, stage1]}])
    assert span == 4.0 and idle == [0.5, 0.25]


def test_the_default_batch_is_per_rank_so_any_world_size_works():
    args = ddp.parser().parse_args([])
    assert [ddp.for_world(args, world).batch for world in (1, 2, 16)] == [4, 8, 64]
    assert ddp.for_world(ddp.parser().parse_args(["--micro-batch", "3"]), 4, accumulation=2).batch == 24
    settled = ddp.for_world(ddp.parser().parse_args(["--batch", "32"]), 16)
    assert settled.batch == 32 and ddp.for_world(settled, 16).batch == 32  # settling twice changes nothing


def test_a_global_batch_that_cannot_split_is_refused_naming_the_per_rank_argument():
    with pytest.raises(ValueError, match="--batch 8 \\(global\\) does not split over 16 ranks .* --micro-batch"):
        ddp.for_world(ddp.parser().parse_args(["--batch", "8"]), 16)
    with pytest.raises(ValueError, match="--batch 8 and --micro-batch 2 disagree"):
        ddp.for_world(ddp.parser().parse_args(["--batch", "8", "--micro-batch", "2"]), 2)
    with pytest.raises(ValueError, match="--micro-batch must be at least 1"):
        ddp.for_world(ddp.parser().parse_args(["--micro-batch", "0"]), 2)
    with pytest.raises(ValueError, match="not settled: pass the arguments through ddp.for_world"):
        ddp.dataset(ddp.parser().parse_args([]))

import pytest

from course_lib.memory import RECIPES, ModelShape, Parallelism, per_device_memory, training_flops_per_token
from course_lib.planner import Cluster, data_parallel_bytes, engine_refusal, plan_parallelism

TINY = ModelShape("tiny", n_layer=4, d_model=64, n_head=4, vocab_size=100, context=128)


def cluster(gpu_bytes=1e12, **kw):
    return Cluster(**({"gpus": 8, "gpus_per_node": 4, "gpu_bytes": gpu_bytes, "peak_flops": 1e12,
                       "intra_node_bytes_per_s": 1e11, "inter_node_bytes_per_s": 1e10} | kw))  # fmt: skip


def find(plans, **parallel):
    return next(p for p in plans if p.parallel == Parallelism(**parallel))


def test_the_planner_enumerates_every_legal_layout_and_stage():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8)
    layouts = {(p.parallel.dp, p.parallel.tp, p.parallel.pp) for p in plans}
    assert layouts == {(8, 1, 1), (4, 1, 2), (2, 1, 4), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1), (1, 4, 2)}
    assert len(plans) == 4 * len(layouts)  # every ZeRO stage of each


def test_a_plan_by_hand():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8, checkpointing=False)
    mine = find(plans, dp=2, tp=2, pp=2, zero_stage=1)
    compute = training_flops_per_token(TINY, 128) * 8 * 128 / (8 * 1e12 * 0.5)
    assert mine.compute_s == pytest.approx(compute)
    assert mine.bubble_s == pytest.approx(compute * (2 - 1) / 4)  # 8 sequences over dp=2: 4 micro-batches per pipeline
    assert mine.tensor_comm_s == pytest.approx(4 * 2 * (1 / 2) * 128 * 64 * 2 * (4 / 2) * 4 / 1e11)
    local = TINY.n_params / 4  # dp x tp = 4 GPUs: one node; ZeRO-1: reduce-scatter gradients, all-gather weights
    assert mine.data_comm_s == pytest.approx((1 / 2) * (local * 2 + local * 2) / 1e11)
    assert mine.data_window_s == pytest.approx(compute / 4)  # the last micro-batch's compute
    assert mine.pipeline_comm_s == pytest.approx(4 * 2 * 128 * 64 * 2 / 2 / 1e10)  # the pipeline spans both nodes
    flat = find(plans, dp=4, tp=2, pp=1, zero_stage=1)
    assert flat.pipeline_comm_s == 0 and flat.bubble_s == 0
    assert mine.memory == per_device_memory(TINY, 1, 128, RECIPES["mixed"], "adam", False, mine.parallel)
    sharded = find(plans, dp=8, tp=1, pp=1, zero_stage=3)  # 8 GPUs on 2 nodes: over the network, 1 micro-batch
    assert sharded.data_comm_s == pytest.approx((7 / 8) * 1 * (TINY.n_params * 2 + 2 * TINY.n_params * 2) / 1e10)
    assert sharded.data_window_s == pytest.approx(compute) and sharded.feasible
    recomputed = find(plan_parallelism(TINY, cluster(), seq=128, global_batch=8), dp=2, tp=2, pp=2, zero_stage=1)
    assert recomputed.tensor_comm_s == pytest.approx(mine.tensor_comm_s * 6 / 4)  # the recomputed forward's two


def test_data_parallel_bytes_by_stage():
    mixed = RECIPES["mixed"]  # 2-byte weights and gradients
    assert [data_parallel_bytes(10, mixed, stage, 3) for stage in range(4)] == [40, 40, 3 * 20 + 20, 3 * (20 + 40)]
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        data_parallel_bytes(10, mixed, 4, 3)
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        data_parallel_bytes(10, mixed, 2, 0)


def test_sharded_gradients_are_reduced_every_micro_batch():
    few = plan_parallelism(TINY, cluster(), seq=128, global_batch=8)  # dp 2: 4 micro-batches per pipeline
    many = plan_parallelism(TINY, cluster(), seq=128, global_batch=32)  # 16 micro-batches
    layout = {"dp": 2, "tp": 2, "pp": 2}
    ratio = [find(many, **layout, zero_stage=s).data_comm_s / find(few, **layout, zero_stage=s).data_comm_s
             for s in range(4)]  # fmt: skip
    assert ratio == pytest.approx([1, 1, (16 + 1) / (4 + 1), 16 / 4])  # ZeRO 0-1: once a step; 2: + each micro-batch
    assert find(few, **layout, zero_stage=2).data_comm_s > find(few, **layout, zero_stage=1).data_comm_s


def test_the_engines_refuse_sharded_gradients_with_a_pipeline():
    assert "PipelineEngine" in engine_refusal(Parallelism(dp=2, pp=2, zero_stage=2))
    assert engine_refusal(Parallelism(dp=2, pp=2, zero_stage=3))
    assert (
        engine_refusal(Parallelism(dp=2, pp=2, zero_stage=1)) == engine_refusal(Parallelism(dp=8, zero_stage=3)) == ""
    )
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8)
    assert {p.parallel for p in plans if not p.feasible} == {
        p.parallel for p in plans if p.parallel.pp > 1 and p.parallel.zero_stage >= 2
    }
    usable = [p.usable for p in plans]
    assert usable == sorted(usable, reverse=True)  # no refused (or too large) plan above one that runs
    last_usable = plans[sum(usable) - 1]
    assert any(p.step_s < last_usable.step_s for p in plans if not p.feasible)  # ranked below though faster


def test_ties_go_to_the_lower_stage():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8)
    # dp 8 and one micro-batch each: ZeRO 0, 1 and 2 send the same bytes; ZeRO-3 gathers the weights twice more
    flat = [p for p in plans if p.parallel.dp == 8]
    assert flat[0].step_s == flat[1].step_s == flat[2].step_s < flat[3].step_s
    assert [p.parallel.zero_stage for p in flat] == [0, 1, 2, 3]
    assert flat[0].memory.total > flat[1].memory.total > flat[2].memory.total  # not the least memory first
    steps = [p.step_s for p in plans if p.usable]
    assert steps == sorted(steps) and plans[0].step_s == min(p.step_s for p in plans if p.usable)


def test_hardware_and_model_flop_utilisation():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8, compute_hfu=0.4)
    recompute = training_flops_per_token(TINY, 128, checkpointing=True) / training_flops_per_token(TINY, 128)
    assert 1.3 < recompute < 4 / 3  # 8N / 6N, less the LM head, which is not recomputed
    for p in plans:
        assert p.hfu() / p.mfu() == pytest.approx(recompute)
        assert p.hfu() == pytest.approx(0.4 * p.compute_s / p.step_s) and p.hfu() < 0.4
        assert p.hfu(overlap=True) == pytest.approx(0.4 * p.compute_s / p.step_s_overlapped)
    plain = plan_parallelism(TINY, cluster(), seq=128, global_batch=8, checkpointing=False)
    assert all(p.hfu() == pytest.approx(p.mfu()) for p in plain)  # nothing recomputed: the same count


def test_overlap_hides_data_parallel_traffic_behind_the_compute_it_can_run_under():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=32)
    for p in plans:
        others = p.compute_s + p.bubble_s + p.tensor_comm_s + p.pipeline_comm_s
        window = p.compute_s / (32 // p.parallel.dp) if p.parallel.zero_stage < 2 else p.compute_s
        assert p.data_window_s == pytest.approx(window)
        assert p.step_s_overlapped == pytest.approx(others + max(0.0, p.data_comm_s - window))
        assert p.step_s_overlapped <= p.step_s
    overlapped = plan_parallelism(TINY, cluster(), seq=128, global_batch=32, overlap=True)
    steps = [p.step_s_overlapped for p in overlapped if p.usable]
    assert steps == sorted(steps) and [p.step_s for p in overlapped if p.usable] != sorted(steps)


def test_headroom_and_sequence_parallelism_decide_what_fits():
    plans = plan_parallelism(TINY, cluster(), seq=128, global_batch=8)
    smallest = min(p.memory.total for p in plans)
    tight = plan_parallelism(TINY, cluster(gpu_bytes=smallest * 1.5), seq=128, global_batch=8)
    spare = plan_parallelism(TINY, cluster(gpu_bytes=smallest * 1.5), seq=128, global_batch=8, headroom=smallest / 2)
    assert sum(p.fits for p in spare) == sum(p.memory.total <= smallest for p in plans) < sum(p.fits for p in tight)
    whole = plan_parallelism(TINY, cluster(), seq=128, global_batch=8, sequence_parallel=False)
    mine = find(whole, dp=2, tp=2, pp=2, zero_stage=1)
    assert mine.memory == per_device_memory(TINY, 1, 128, checkpointing=True, parallel=mine.parallel,
                                            sequence_parallel=False)  # fmt: skip
    assert mine.memory.activations == 2 * find(plans, dp=2, tp=2, pp=2, zero_stage=1).memory.activations


@pytest.mark.parametrize(
    "kwargs, message",
    [({"gpus": 6}, "whole nodes of gpus_per_node=4"), ({"peak_flops": 0}, "peak_flops must be positive")],
)
def test_bad_clusters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compute_hfu": 1.5}, r"compute_hfu must be in \(0, 1\]"),
        ({"global_batch": 0}, "global_batch must be a positive int"),
        ({"headroom": -1.0}, "headroom must be at least 0"),
        ({"headroom": 1e12}, "headroom must be at least 0 and below gpu_bytes"),
        ({"seq": 256}, "seq=256 exceeds the model's context=128"),
    ],
)
def test_bad_plan_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_parallelism(TINY, cluster(), **({"seq": 128, "global_batch": 8} | kwargs))


def test_a_batch_no_layout_can_split_is_refused():
    one_head = ModelShape("one head, one layer", n_layer=1, d_model=8, n_head=1, vocab_size=10, context=16)
    with pytest.raises(ValueError, match="global_batch=3 is not divisible by the data-parallel degree"):
        plan_parallelism(one_head, cluster(), seq=16, global_batch=3)
    with pytest.raises(TypeError, match="cluster must be a Cluster"):
        plan_parallelism(TINY, {"gpus": 8}, seq=128, global_batch=8)

"""parallel_state: group layout as a pure function (Megatron's 16-rank example) and real groups."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from tests.multiprocess import run_distributed


def test_megatron_documented_layout_16_ranks_tp2_pp4():
    # Megatron-LM's docstring example: 16 GPUs, tp=2, pp=4 -> dp=2.
    g = ps.compute_rank_groups(16, 2, 4)
    assert g["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert g["data"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert g["pipeline"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert g["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert g["model"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (12, 3, 2), (16, 4, 1), (6, 1, 3)])
def test_groups_partition_the_world(world, tp, pp):
    g = ps.compute_rank_groups(world, tp, pp)
    for kind in ("tensor", "data", "pipeline", "model"):
        flat = sorted(r for ranks in g[kind] for r in ranks)
        assert flat == list(range(world)), kind
    for r in range(world):  # rank = pp_rank * dp * tp + dp_rank * tp + tp_rank
        dp = world // (tp * pp)
        tp_rank, dp_rank, pp_rank = r % tp, (r // tp) % dp, r // (tp * dp)
        assert [x for x in g["tensor"] if r in x][0].index(r) == tp_rank
        assert [x for x in g["data"] if r in x][0].index(r) == dp_rank
        assert [x for x in g["pipeline"] if r in x][0].index(r) == pp_rank


def test_bad_world_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible.*tensor-model-parallel"):
        ps.compute_rank_groups(6, 4, 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        ps.compute_rank_groups(4, 0, 1)


def test_getters_fail_clearly_before_init():
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ps.get_tensor_model_parallel_group()


def _real_groups(rank, world, tp, pp):
    ps.initialize_model_parallel(tp, pp)
    out = {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        "first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage(),
        "emb": ps.is_rank_in_embedding_group(),
        "next": ps.get_pipeline_model_parallel_next_rank(), "prev": ps.get_pipeline_model_parallel_prev_rank(),
    }
    # The groups really communicate: sum of global ranks within each group.
    for name, getter, ranks in [("tp_sum", ps.get_tensor_model_parallel_group,
                                 ps.get_tensor_model_parallel_global_ranks()),
                                ("dp_sum", ps.get_data_parallel_group, ps.get_data_parallel_global_ranks()),
                                ("pp_sum", ps.get_pipeline_model_parallel_group,
                                 ps.get_pipeline_model_parallel_global_ranks())]:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getter())
        assert t.item() == sum(ranks), (name, t.item(), ranks)
    with pytest.raises(RuntimeError, match="already initialized"):
        ps.initialize_model_parallel(tp, pp)
    return out


def test_real_groups_world4_tp2_pp2():
    res = run_distributed(_real_groups, 4, args=(2, 2))
    assert [r["tp"] for r in res] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [r["dp"] for r in res] == [(0, 1)] * 4
    assert [r["pp"] for r in res] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [r["first"] for r in res] == [True, True, False, False]
    assert [r["last"] for r in res] == [False, False, True, True]
    assert all(r["emb"] for r in res)
    assert [r["next"] for r in res] == [2, 3, 0, 1]


def test_real_groups_world4_tp2_dp2():
    res = run_distributed(_real_groups, 4, args=(2, 1))
    assert [r["dp"] for r in res] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert all(r["first"] and r["last"] for r in res)

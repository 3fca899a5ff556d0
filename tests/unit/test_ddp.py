"""DistributedDataParallel and finalize_model_grads on 2 gloo ranks vs single-process references.

One spawn runs: DP=2 gradient accumulation (sync, overlapped/bucketed, AVG-in-collective, bf16 with fp32
buffers) against the full-batch gradient; 3 training steps against a dense AdamW run; TP=2 all-reduce of
sequence-parallel norm grads; PP=2 tied-embedding grads through the model's own getter.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from tests.multiprocess import run_distributed

GBS, MBS, DP = 8, 2, 2
NUM_MICRO = GBS // (MBS * DP)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):  # [b, 6] -> [b, 3]
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def _net(dtype=torch.float32):
    torch.manual_seed(3)
    return _Net().to(dtype)


def _batch(it):
    g = torch.Generator().manual_seed(100 + it)
    return torch.randn(GBS, 6, generator=g), torch.randn(GBS, 3, generator=g)


def _reference_grads(it, dtype=torch.float32):
    net = _net(dtype)
    x, y = _batch(it)
    F.mse_loss(net(x.to(dtype)).float(), y).backward()
    return {n: p.grad.float() for n, p in net.named_parameters()}


def _local_backward(model, rank, it, dtype=torch.float32):
    """This rank's micro-batches; all but the last under no_sync; loss averaged over micro-batches."""
    x, y = _batch(it)
    x, y = x[rank * GBS // DP:(rank + 1) * GBS // DP], y[rank * GBS // DP:(rank + 1) * GBS // DP]
    for m in range(NUM_MICRO):
        ctx = model.no_sync() if m < NUM_MICRO - 1 else contextlib.nullcontext()
        with ctx:
            xb, yb = x[m * MBS:(m + 1) * MBS], y[m * MBS:(m + 1) * MBS]
            (F.mse_loss(model(xb.to(dtype)).float(), yb) / NUM_MICRO).backward()


def _grad_case(rank, ddp_config, dtype=torch.float32):
    net = _net(dtype)
    model = DistributedDataParallel(ModelParallelConfig(), ddp_config, net)
    model.zero_grad_buffer()
    _local_backward(model, rank, 0, dtype)
    freed = all(p.grad is None for p in net.parameters())
    issued = all(b.communication_issued for buf in model.buffers for b in buf.buckets)
    n_buckets = sum(len(buf.buckets) for buf in model.buffers)
    finalize_model_grads([model])
    ref = _reference_grads(0, dtype)
    errs = {n: ((p.main_grad.float() - ref[n]).abs().max() / ref[n].abs().max()).item()
            for n, p in net.named_parameters()}
    dtypes = {p.main_grad.dtype for p in net.parameters()}
    # A second global batch after zero_grad_buffer starts from zero again.
    model.zero_grad_buffer()
    zeroed = all(p.main_grad.abs().sum().item() == 0 for p in net.parameters())
    return {"max_rel_err": max(errs.values()), "freed": freed, "issued_during_backward": issued,
            "n_buckets": n_buckets, "dtypes": dtypes, "zeroed": zeroed}


def _train_case(rank, steps=3):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.05)
    net = _net()
    model = DistributedDataParallel(ModelParallelConfig(), DistributedDataParallelConfig(
        overlap_grad_reduce=True, bucket_size=50), net)
    opt = get_megatron_optimizer(cfg, [model])
    ref = _net()
    decay = [ref.fc1.weight, ref.fc2.weight]
    no_decay = [p for p in ref.parameters() if p.dim() == 1]
    ref_opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
    norms, ref_norms = [], []
    for it in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        _local_backward(model, rank, it)
        finalize_model_grads([model])
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
        ref_opt.zero_grad()
        x, y = _batch(it)
        F.mse_loss(ref(x), y).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.clip_grad).item())
        ref_opt.step()
    err = max(((p - r).abs().max() / r.abs().max()).item() for p, r in zip(net.parameters(), ref.parameters()))
    keys_match = list(model.state_dict().keys()) == list(net.state_dict().keys())
    # broadcast_params: rank 1 drifts, then gets rank 0's weights back.
    if rank == 1:
        with torch.no_grad():
            net.fc1.weight.add_(1.0)
    model.broadcast_params()
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    torch.distributed.all_gather(gathered, flat, group=ps.get_data_parallel_group())
    return {"norms": norms, "ref_norms": ref_norms, "max_rel_err": err, "keys_match": keys_match,
            "replicas_equal": torch.equal(gathered[0], gathered[1])}


class _SPBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.Parameter(torch.ones(4))
        self.ln.sequence_parallel = True
        self.w = torch.nn.Parameter(torch.ones(3, 4))
        self.w.tensor_model_parallel, self.w.partition_dim, self.w.partition_stride = True, 0, 1


def _sp_case(rank, sequence_parallel):
    block = _SPBlock()
    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), block)
    model.zero_grad_buffer()
    ((block.ln * (rank + 1.0)).sum() + (block.w * (10.0 * (rank + 1))).sum()).backward()
    finalize_model_grads([model])  # config taken from the wrapper
    return {"ln": block.ln.main_grad.tolist(), "w": block.w.main_grad.tolist()}


class _TiedStage(torch.nn.Module):
    """A stage exposing megatron-core's getter instead of a shared_embedding mark."""

    def __init__(self, tied):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(5, 2))
        self.share_embeddings_and_output_weights = tied

    def shared_embedding_or_output_weight(self):
        return self.weight


def _pp_case(rank, tied):
    stage = _TiedStage(tied)
    model = DistributedDataParallel(ModelParallelConfig(pipeline_model_parallel_size=2),
                                    DistributedDataParallelConfig(), stage)
    model.zero_grad_buffer()
    (stage.weight * (rank + 1.0)).sum().backward()
    finalize_model_grads([model])
    return stage.weight.main_grad[0, 0].item()


def _body(rank, world_size):
    ps.initialize_model_parallel(1, 1)
    out = {"grads": {
        "sync": _grad_case(rank, DistributedDataParallelConfig()),
        "overlap": _grad_case(rank, DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=40)),
        "avg": _grad_case(rank, DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=40,
                                                              average_in_collective=True)),
        "bf16_fp32_buffer": _grad_case(rank, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                       torch.bfloat16),
    }}
    out["train"] = _train_case(rank)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(2, 1)
    out["sp_on"], out["sp_off"] = _sp_case(rank, True), _sp_case(rank, False)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2)
    out["pp_tied"], out["pp_untied"] = _pp_case(rank, True), _pp_case(rank, False)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=2)


@pytest.mark.parametrize("case", ["sync", "overlap", "avg"])
def test_dp2_accumulated_grads_equal_full_batch_grads(results, case):
    for r in results:
        g = r["grads"][case]
        assert g["max_rel_err"] < 1e-5, g
        assert g["freed"] and g["zeroed"] and g["dtypes"] == {torch.float32}
    if case != "sync":
        g = results[0]["grads"][case]
        assert g["n_buckets"] > 1 and g["issued_during_backward"]  # overlapped with backward
    else:
        assert results[0]["grads"][case]["n_buckets"] == 1 and not results[0]["grads"][case]["issued_during_backward"]


def test_bf16_params_reduce_in_fp32_buffers(results):
    g = results[0]["grads"]["bf16_fp32_buffer"]
    assert g["dtypes"] == {torch.float32}
    assert g["max_rel_err"] < 3e-2  # bf16 forward/backward vs the bf16 full-batch reference


def test_dp2_training_matches_dense_adamw(results):
    for r in results:
        t = r["train"]
        assert t["norms"] == pytest.approx(t["ref_norms"], rel=1e-5)
        assert t["max_rel_err"] < 1e-5
        assert t["keys_match"] and t["replicas_equal"]


def test_sequence_parallel_norm_grads_summed_over_tp(results):
    for r in results:
        assert r["sp_on"]["ln"] == [3.0] * 4  # 1 + 2: summed over TP ranks
        assert r["sp_off"]["ln"] in ([1.0] * 4, [2.0] * 4)  # sequence parallelism off: untouched
    assert results[0]["sp_on"]["w"] == [[10.0] * 4] * 3 and results[1]["sp_on"]["w"] == [[20.0] * 4] * 3


def test_pp2_tied_embedding_grads_summed_over_embedding_group(results):
    assert [r["pp_tied"] for r in results] == [3.0, 3.0]
    assert [r["pp_untied"] for r in results] == [1.0, 2.0]

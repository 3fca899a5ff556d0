"""Global grad norm / clipping / zero count at TP=2 and PP=2 (gloo ranks) vs dense torch references.

One spawn of 2 ranks runs both layouts; the parent compares against torch.nn.utils.clip_grad_norm_ on
the dense (unsharded, each parameter once) tensors.
"""

import pytest
import torch

from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.optimizer import (
    DynamicGradScaler,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
    get_grad_norm_fp32,
    get_megatron_optimizer,
)
from tests.multiprocess import run_distributed

MAX_NORM = 0.5
LR = 1e-2


def _tp_dense():
    """Global grads of a column-parallel W1/b1, a row-parallel W2, and replicated b2 / norm params."""
    g = torch.Generator().manual_seed(7)
    shapes = {"w1": (8, 6), "b1": (8,), "w2": (5, 8), "b2": (5,), "ln_w": (5,), "ln_b": (5,)}
    grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    grads["w1"][0, :3] = 0.0
    grads["b2"][4] = 0.0
    return grads


# name -> partition_dim for sharded params (None = replicated)
_TP_LAYOUT = {"w1": 0, "b1": 0, "w2": 1, "b2": None, "ln_w": None, "ln_b": None}


def _shard(t, dim, rank, size):
    return t.chunk(size, dim=dim)[rank].clone() if dim is not None else t.clone()


def _tp_params(rank, dtype=torch.float32):
    params = {}
    for name, grad in _tp_dense().items():
        dim = _TP_LAYOUT[name]
        p = torch.nn.Parameter(torch.ones_like(_shard(grad, dim, rank, 2), dtype=dtype))
        p.tensor_model_parallel = dim is not None
        if dim is not None:
            p.partition_dim, p.partition_stride = dim, 1
        p.grad = _shard(grad, dim, rank, 2).to(dtype)
        params[name] = p
    return params


def _pp_dense():
    g = torch.Generator().manual_seed(11)
    return {"emb0": torch.randn(10, 4, generator=g), "emb1": torch.randn(10, 4, generator=g),
            "w": torch.randn(4, 4, generator=g), "ln": torch.randn(4, generator=g),
            "init_emb": torch.randn(10, 4, generator=g), "init_w": torch.randn(4, 4, generator=g)}


class _Stage(torch.nn.Module):
    def __init__(self, first, dense):
        super().__init__()
        emb = torch.nn.Parameter(dense["init_emb"].clone())
        emb.shared_embedding = True
        if first:
            self.word_embeddings = emb
            self.w = torch.nn.Parameter(dense["init_w"].clone())
        else:
            emb.shared = True  # the last stage's copy: excluded from the norm
            self.word_embeddings_for_head = emb
            self.ln = torch.nn.Parameter(torch.ones(4))


def _body(rank, world_size):
    out = {}
    # ---- TP=2: sharded + replicated params ----
    ps.initialize_model_parallel(2, 1)
    params = _tp_params(rank)
    cfg = OptimizerConfig(optimizer="sgd", lr=0.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=MAX_NORM,
                          log_num_zeros_in_grad=True)
    opt = FP32Optimizer(torch.optim.SGD(list(params.values()), lr=0.0), cfg)
    ok, norm, zeros = opt.step()
    out["tp"] = {"ok": ok, "norm": norm, "zeros": zeros, "clipped": {k: p.grad.clone() for k, p in params.items()}}
    fresh = _tp_params(rank)
    dedup = [p.grad for k, p in fresh.items() if _TP_LAYOUT[k] is not None or rank == 0]
    out["tp"]["inf_norm"] = get_grad_norm_fp32(dedup, norm_type=float("inf"),
                                               model_parallel_group=ps.get_model_parallel_group())
    # Overflow on one TP rank only: both ranks must skip the step.
    half = _tp_params(rank, torch.float16)
    if rank == 1:
        half["w2"].grad[0, 0] = float("inf")
    cfg16 = OptimizerConfig(lr=1.0, fp16=True, params_dtype=torch.float16, clip_grad=MAX_NORM)
    opt16 = Float16OptimizerWithFloat16Params(torch.optim.AdamW(list(half.values()), lr=1.0), cfg16,
                                              DynamicGradScaler(1.0, 1.0, hysteresis=1, device="cpu"))
    out["tp"]["fp16_step"] = opt16.step()
    out["tp"]["fp16_unchanged"] = all(torch.equal(p, torch.ones_like(p)) for p in half.values())
    ps.destroy_model_parallel()

    # ---- PP=2: tied embeddings on both stages, norm over the model-parallel (PP) group ----
    ps.initialize_model_parallel(1, 2)
    dense = _pp_dense()
    stage = _Stage(first=rank == 0, dense=dense)
    model = DistributedDataParallel(ModelParallelConfig(pipeline_model_parallel_size=2),
                                    DistributedDataParallelConfig(), stage)
    model.zero_grad_buffer()
    if rank == 0:
        loss = (stage.word_embeddings * dense["emb0"]).sum() + (stage.w * dense["w"]).sum()
    else:
        loss = (stage.word_embeddings_for_head * dense["emb1"]).sum() + (stage.ln * dense["ln"]).sum()
    loss.backward()
    finalize_model_grads([model])
    emb = stage.word_embeddings if rank == 0 else stage.word_embeddings_for_head
    out["pp_emb_grad"] = emb.main_grad.clone()
    popt = get_megatron_optimizer(OptimizerConfig(lr=LR, weight_decay=0.0, clip_grad=MAX_NORM), [model])
    ok, norm, _ = popt.step()
    out["pp"] = {"ok": ok, "norm": norm, "params": {n: p.detach().clone() for n, p in stage.named_parameters()}}
    return out  # run_distributed carries tensors back as numpy and rebuilds them


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=2)


def test_tp2_norm_and_clipping_equal_dense(results):
    dense = _tp_dense()
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in dense.values()]
    for p, g in zip(ref, dense.values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, MAX_NORM).item()
    assert ref_norm > MAX_NORM  # clipping really happens
    for r in results:
        assert r["tp"]["ok"] and r["tp"]["norm"] == pytest.approx(ref_norm, rel=1e-6)
    for (name, dim), p in zip(_TP_LAYOUT.items(), ref):
        shards = [r["tp"]["clipped"][name] for r in results]
        full = torch.cat(shards, dim=dim) if dim is not None else shards[0]
        if dim is None:
            torch.testing.assert_close(shards[1], shards[0], rtol=0, atol=0)  # replicas clipped alike
        torch.testing.assert_close(full, p.grad, rtol=1e-6, atol=1e-7)


def test_tp2_inf_norm_and_zero_count(results):
    dense = _tp_dense()
    ref_inf = max(g.abs().max().item() for g in dense.values())
    ref_zeros = sum(int((g == 0).sum()) for g in dense.values())
    for r in results:
        assert r["tp"]["inf_norm"] == pytest.approx(ref_inf, rel=1e-6)
        assert r["tp"]["zeros"] == ref_zeros


def test_tp2_overflow_on_one_rank_skips_on_all(results):
    for r in results:
        assert r["tp"]["fp16_step"] == (False, None, None)
        assert r["tp"]["fp16_unchanged"]


def test_pp2_tied_embedding_counted_once_and_both_copies_step_alike(results):
    dense = _pp_dense()
    emb_grad = dense["emb0"] + dense["emb1"]
    for r in results:
        torch.testing.assert_close(r["pp_emb_grad"], emb_grad, rtol=1e-6, atol=1e-6)
    # Dense reference: one embedding, one w, one ln; torch clip + AdamW.
    ref = {"emb": torch.nn.Parameter(dense["init_emb"].clone()), "w": torch.nn.Parameter(dense["init_w"].clone()),
           "ln": torch.nn.Parameter(torch.ones(4))}
    ref["emb"].grad, ref["w"].grad, ref["ln"].grad = emb_grad.clone(), dense["w"].clone(), dense["ln"].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), MAX_NORM).item()
    torch.optim.AdamW(list(ref.values()), lr=LR, weight_decay=0.0).step()
    for r in results:
        assert r["pp"]["ok"] and r["pp"]["norm"] == pytest.approx(ref_norm, rel=1e-6)
    first, last = results[0]["pp"]["params"], results[1]["pp"]["params"]
    torch.testing.assert_close(first["word_embeddings"], ref["emb"].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(last["word_embeddings_for_head"], first["word_embeddings"], rtol=0, atol=0)
    torch.testing.assert_close(first["w"], ref["w"].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(last["ln"], ref["ln"].detach(), rtol=1e-6, atol=1e-7)

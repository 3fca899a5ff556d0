"""Pipeline schedules against a dense single-process reference (float64 toy pipeline, one 4-rank spawn).

Each (virtual) stage is ``x -> tanh(x W_k)`` on [s, b, h]; the last one returns ``sum((y - t)^2)``.
The reference chains all stages in one autograd graph and averages the micro-batch losses. Checked:
1F1B at PP=4 (more and fewer micro-batches than stages, deallocated outputs), the interleaved
schedule at PP=2 x 2 chunks (with DP=2; micro-batches == PP and > PP), forward-only, the loss scale
(grad_scale_func), no_sync contexts left exactly before each chunk's last backward, finalize once.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import schedules
from megatron.core.pipeline_parallel.schedules_interleaved import forward_backward_pipelining_with_interleaving
from tests.multiprocess import run_distributed

S, B, H, SEED = 3, 2, 4, 1234


@dataclass
class _Config(ModelParallelConfig):
    hidden_size: int = H


def _weight(k):
    return torch.randn(H, H, generator=torch.Generator().manual_seed(SEED + k), dtype=torch.float64) / 2


def _microbatches(n):
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randn(B, S, H, generator=g, dtype=torch.float64),
             torch.randn(S, B, H, generator=g, dtype=torch.float64)) for _ in range(n)]


class _Stage(nn.Module):
    """Virtual stage ``k``: first stage reads x [b, s, h]; others the previous stage's [s, b, h]."""

    def __init__(self, config, k, pre, post):
        super().__init__()
        self.config, self.pre, self.post = config, pre, post
        self.weight = nn.Parameter(_weight(k))
        self.input_tensor = None
        self.backwards = 0
        self.weight.register_hook(self._count)

    def _count(self, grad):
        self.backwards += 1
        return grad

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x, target):
        h = x.transpose(0, 1) if self.pre else self.input_tensor
        y = torch.tanh(h @ self.weight)  # [s, b, h]
        return ((y - target) ** 2).sum() if self.post else y


def _forward_step(data_iterator, model):
    x, target = next(data_iterator)
    out = model(x, target)
    return out, lambda o: (o, {"loss": o.detach().clone()})


def _reference(num_stages, n, scale):
    weights = [_weight(k).requires_grad_() for k in range(num_stages)]
    losses = []
    for x, target in _microbatches(n):
        h = x.transpose(0, 1)
        for w in weights:
            h = torch.tanh(h @ w)
        losses.append(((h - target) ** 2).sum())
    (scale * sum(losses) / n).backward()
    return [w.grad for w in weights], losses


def _run_case(pp, vpp, n, dealloc=False, forward_only=False):
    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _Config(pipeline_dtype=torch.float64, params_dtype=torch.float64, pipeline_model_parallel_size=pp,
                     virtual_pipeline_model_parallel_size=vpp, deallocate_pipeline_outputs=dealloc)
    chunks = []
    for c in range(vpp or 1):
        if vpp:
            parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        chunks.append(_Stage(config, c * pp + rank, parallel_state.is_pipeline_first_stage(),
                             parallel_state.is_pipeline_last_stage()))
    if vpp:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    events = []

    def no_sync_for(c):
        class _Ctx:
            def __enter__(self):
                events.append(("enter", c, chunks[c].backwards))

            def __exit__(self, *exc):
                events.append(("exit", c, chunks[c].backwards))
        return _Ctx

    config.grad_scale_func = lambda loss: 8.0 * loss
    config.no_sync_func = [no_sync_for(c) for c in range(len(chunks))] if vpp else no_sync_for(0)
    config.finalize_model_grads_func = lambda model: events.append(("finalize", len(model)))
    func = schedules.get_forward_backward_func()
    expected = (forward_backward_pipelining_with_interleaving if vpp
                else schedules.forward_backward_pipelining_without_interleaving)
    assert func is expected
    iters = [iter(_microbatches(n)) for _ in chunks]
    out = func(forward_step_func=_forward_step, data_iterator=iters if vpp else iters[0],
               model=chunks if vpp else chunks[0], num_microbatches=n, seq_length=S, micro_batch_size=B,
               forward_only=forward_only)
    ref_grads, ref_losses = _reference(pp * (vpp or 1), n, 8.0)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        assert [float(d["loss"]) for d in out] == pytest.approx([float(v.detach()) for v in ref_losses], rel=1e-12)
    else:
        assert out == []
    for c, chunk in enumerate(chunks):
        if forward_only:
            assert chunk.weight.grad is None
            continue
        torch.testing.assert_close(chunk.weight.grad, ref_grads[c * pp + rank], rtol=1e-10, atol=1e-12)
    if forward_only:
        assert events == []
    else:
        assert events[-1] == ("finalize", len(chunks))
        for c in range(len(chunks)):
            # Each chunk: no_sync entered before any backward, left right before its last backward.
            assert ("enter", c, 0) in events and ("exit", c, n - 1) in events, events


def _run_layout(pp, vpp, cases):
    parallel_state.initialize_model_parallel(1, pp, vpp)
    for n, kw in cases:
        _run_case(pp, vpp, n, **kw)
    parallel_state.destroy_model_parallel()


def _body(rank, world):
    # 1F1B at PP=4: more and fewer micro-batches than stages, deallocated outputs, forward-only.
    _run_layout(4, None, [(6, {}), (2, {}), (5, dict(dealloc=True)), (6, dict(forward_only=True))])
    # Interleaved at PP=2 (DP=2): micro-batches > stages, == stages (all warm-up), forward-only.
    _run_layout(2, 2, [(4, {}), (2, {}), (4, dict(forward_only=True))])
    _run_layout(2, 3, [(6, dict(dealloc=True))])
    # Interleaving needs num_microbatches % pp == 0, with a clear message.
    parallel_state.initialize_model_parallel(1, 2, 2)
    chunks = [nn.Linear(1, 1) for _ in range(2)]
    for c in chunks:
        c.config = _Config()
    with pytest.raises(ValueError, match=r"micro-batches \(3\).*--pipeline-model-parallel-size \(2\)"):
        forward_backward_pipelining_with_interleaving(forward_step_func=_forward_step, data_iterator=[None, None],
                                                      model=chunks, num_microbatches=3, seq_length=S,
                                                      micro_batch_size=B)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    assert schedules.get_forward_backward_func() is schedules.forward_backward_no_pipelining
    return True


def test_schedules_match_dense_reference():
    assert run_distributed(_body, 4, timeout=180) == [True] * 4

"""Pipeline p2p ops on 4 gloo ranks: who receives what, shapes (sequence parallel), dtype, ring wrap-around.

Every sent tensor is filled from (sender's global rank, direction), so a receiver can tell exactly
which message it got -- including the ambiguous case of two messages to the same peer in one batch
(PP=2, interleaved steady state).
"""

from dataclasses import dataclass

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import p2p_communication as p2p
from tests.multiprocess import run_distributed

S, B, H = 4, 3, 5


@dataclass
class _Config(ModelParallelConfig):
    hidden_size: int = H


def _msg(shape, sender, direction, dtype=torch.float32):
    """A tensor whose values identify its sender (global rank) and direction (0 forward, 1 backward)."""
    base = 1000.0 * sender + 100.0 * direction
    return (base + torch.arange(int(torch.tensor(shape).prod()), dtype=dtype)).reshape(shape)


def _pp2_tp2_sp(rank):
    parallel_state.initialize_model_parallel(2, 2)
    config = _Config(tensor_model_parallel_size=2, sequence_parallel=True, params_dtype=torch.float32,
                     pipeline_dtype=torch.float64)
    shape = p2p.get_tensor_shape(config, S, B)
    assert shape == (S // 2, B, H)
    with pytest.raises(ValueError, match="--seq-length"):
        p2p.get_tensor_shape(config, S + 1, B)
    first = parallel_state.is_pipeline_first_stage()
    peer = parallel_state.get_pipeline_model_parallel_next_rank()
    assert peer == parallel_state.get_pipeline_model_parallel_prev_rank() == (rank + 2) % 4

    # Plain ops; first/last stage skip what they cannot do.
    if first:
        assert p2p.recv_forward(shape, config) is None
        p2p.send_forward(_msg(shape, rank, 0), shape, config)  # fp32 in, sent as pipeline_dtype fp64
        grad = p2p.recv_backward(shape, config)
        assert grad.dtype == torch.float64 and torch.equal(grad, _msg(shape, peer, 1, torch.float64))
        p2p.send_backward(_msg(shape, rank, 1), shape, config)  # no-op on the first stage
    else:
        act = p2p.recv_forward(shape, config)
        assert act.dtype == torch.float64 and act.requires_grad
        assert torch.equal(act.detach(), _msg(shape, peer, 0, torch.float64))
        assert p2p.recv_backward(shape, config) is None
        p2p.send_backward(_msg(shape, rank, 1), shape, config)
        p2p.send_forward(_msg(shape, rank, 0), shape, config)  # no-op on the last stage

    # Combined 1F1B steady-state ops.
    if first:
        grad = p2p.send_forward_recv_backward(_msg(shape, rank, 0), shape, config)
        assert torch.equal(grad, _msg(shape, peer, 1, torch.float64))
        assert p2p.send_backward_recv_forward(_msg(shape, rank, 1), shape, config) is None
    else:
        act = p2p.send_backward_recv_forward(_msg(shape, rank, 1), shape, config)
        assert torch.equal(act.detach(), _msg(shape, peer, 0, torch.float64))
        assert p2p.send_forward_recv_backward(_msg(shape, rank, 0), shape, config) is None

    # Interleaved steady state with two stages: an activation and a gradient travel to the same peer
    # in one batch (stage 1 -> stage 0 closes the ring); they must not be swapped.
    act, grad = p2p.send_forward_backward_recv_forward_backward(
        _msg(shape, rank, 0), _msg(shape, rank, 1), True, True, shape, config)
    assert torch.equal(act.detach(), _msg(shape, peer, 0, torch.float64))
    assert torch.equal(grad, _msg(shape, peer, 1, torch.float64))

    with pytest.raises(RuntimeError, match=r"shape \(4, 3, 5\).*expects \(2, 3, 5\)"):
        p2p.send_forward_recv_forward(torch.zeros(S, B, H), False, shape, config)
    parallel_state.destroy_model_parallel()


def _pp4_ring(rank):
    parallel_state.initialize_model_parallel(1, 4)
    config = _Config(params_dtype=torch.float32)
    shape = p2p.get_tensor_shape(config, S, B)
    assert shape == (S, B, H)
    prev, nxt = (rank - 1) % 4, (rank + 1) % 4
    act = p2p.send_forward_recv_forward(_msg(shape, rank, 0), True, shape, config)
    assert torch.equal(act.detach(), _msg(shape, prev, 0))
    grad = p2p.send_backward_recv_backward(_msg(shape, rank, 1), True, shape, config)
    assert torch.equal(grad, _msg(shape, nxt, 1))
    # Receive-only and send-only halves pair up: even ranks send forward, odd ranks receive.
    if rank % 2 == 0:
        assert p2p.send_forward_recv_forward(_msg(shape, rank, 0), False, shape, config) is None
    else:
        act = p2p.send_forward_recv_forward(None, True, shape, config)
        assert torch.equal(act.detach(), _msg(shape, prev, 0))
    parallel_state.destroy_model_parallel()


def _body(rank, world):
    _pp2_tp2_sp(rank)
    _pp4_ring(rank)
    return True


def test_p2p_ops():
    assert run_distributed(_body, 4, timeout=120) == [True] * 4

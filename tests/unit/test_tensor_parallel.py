"""Tensor-parallel mappings, layers, cross entropy and RNG/checkpointing against dense references.

One spawn per world size runs every check (process start-up dominates the cost).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.core.model_parallel_config import ModelParallelConfig
from tests.multiprocess import run_distributed

ATOL = 1e-5


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=ATOL, rtol=1e-5), f"{what}: max abs err {err}"


def _gather(t, dim):
    """All-gather a TP shard along ``dim`` (test-side, plain torch.distributed)."""
    world = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _shard(t, dim):
    world, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return t.chunk(world, dim=dim)[rank].contiguous()


def _same_on_all_ranks(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _check_mappings(world):
    rank = ps.get_tensor_model_parallel_rank()
    coeff = float(rank + 1)
    total = world * (world + 1) / 2  # sum of coeffs over ranks
    x = _same_on_all_ranks(1, 4, 3, 2 * world)

    # copy_to: identity forward, all-reduce backward.
    xi = x.clone().requires_grad_()
    y = tp.copy_to_tensor_model_parallel_region(xi)
    _close(y, x, "copy_to fwd")
    (y * coeff).sum().backward()
    _close(xi.grad, torch.full_like(x, total), "copy_to bwd")

    # reduce_from: all-reduce forward, identity backward.
    xi = (x * coeff).requires_grad_()
    y = tp.reduce_from_tensor_model_parallel_region(xi)
    _close(y, x * total, "reduce_from fwd")
    y.sum().backward()
    _close(xi.grad, torch.ones_like(x), "reduce_from bwd")
    _close(xi.detach(), x * coeff, "reduce_from leaves its input untouched")

    # scatter_to (last dim): split forward, gather backward.
    xi = x.clone().requires_grad_()
    y = tp.scatter_to_tensor_model_parallel_region(xi)
    _close(y, _shard(x, -1), "scatter_to fwd")
    (y * coeff).sum().backward()
    expected = torch.cat([torch.full_like(_shard(x, -1), r + 1.0) for r in range(world)], dim=-1)
    _close(xi.grad, expected, "scatter_to bwd")

    # gather_from (last dim): gather forward, split backward.
    xi = _shard(x, -1).requires_grad_()
    y = tp.gather_from_tensor_model_parallel_region(xi)
    _close(y, x, "gather_from fwd")
    w = _same_on_all_ranks(2, *x.shape)
    (y * w).sum().backward()
    _close(xi.grad, _shard(w, -1), "gather_from bwd")

    # Sequence-parallel trio on dim 0: x is [s, b, h] with s divisible by world.
    s = _same_on_all_ranks(3, 2 * world, 3, 5)
    si = s.clone().requires_grad_()
    y = tp.scatter_to_sequence_parallel_region(si)
    _close(y, _shard(s, 0), "scatter_to_sp fwd")
    (y * coeff).sum().backward()
    expected = torch.cat([torch.full_like(_shard(s, 0), r + 1.0) for r in range(world)], dim=0)
    _close(si.grad, expected, "scatter_to_sp bwd")

    si = _shard(s, 0).requires_grad_()
    y = tp.gather_from_sequence_parallel_region(si)
    _close(y, s, "gather_from_sp fwd")
    (y * coeff).sum().backward()  # each rank's grad is partial -> reduce-scatter sums them
    _close(si.grad, torch.full_like(si, total), "gather_from_sp bwd (reduce-scatter)")
    si = _shard(s, 0).requires_grad_()
    w = _same_on_all_ranks(4, *s.shape)
    (tp.gather_from_sequence_parallel_region(si, tensor_parallel_output_grad=False) * w).sum().backward()
    _close(si.grad, _shard(w, 0), "gather_from_sp bwd (split)")

    si = (s * coeff).requires_grad_()
    y = tp.reduce_scatter_to_sequence_parallel_region(si)
    _close(y, _shard(s * total, 0), "reduce_scatter_to_sp fwd")
    w = _same_on_all_ranks(5, *s.shape)
    (y * _shard(w, 0)).sum().backward()
    _close(si.grad, w, "reduce_scatter_to_sp bwd (all-gather)")


def _run_dense_and_parallel(layer, dense_w, dense_b, x_full, x_in, out_slice, bias_returned, dim_w):
    """Compare layer(x_in) to F.linear(x_full, dense_w, dense_b): outputs and all gradients."""
    x_ref = x_full.clone().requires_grad_()
    w_ref = dense_w.clone().requires_grad_()
    b_ref = dense_b.clone().requires_grad_() if dense_b is not None else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    gy = _same_on_all_ranks(11, *y_ref.shape)
    (y_ref * gy).sum().backward()

    x_in = x_in.clone().requires_grad_()
    out, bias = layer(x_in)
    if bias_returned:
        assert bias is layer.bias
        out = out + (tp.gather_from_tensor_model_parallel_region(bias) if out.shape[-1] != bias.shape[-1] else bias)
    else:
        assert bias is None
    _close(out, out_slice(y_ref.detach()), "output")
    (out * out_slice(gy)).sum().backward()
    return x_ref, x_in, w_ref, b_ref


def _check_layers(world):
    torch.manual_seed(1234)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world)
    h_in, h_out = 8, 4 * world
    x = _same_on_all_ranks(7, 5, 2, h_in)  # [s, b, h]

    for gather_output in (False, True):
        for skip_bias_add in (False, True):
            torch.manual_seed(42)
            col = tp.ColumnParallelLinear(h_in, h_out, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                          gather_output=gather_output, skip_bias_add=skip_bias_add)
            with torch.no_grad():
                col.bias.uniform_(-1, 1)
            dense_w, dense_b = _gather(col.weight.detach(), 0), _gather(col.bias.detach(), 0)
            # TP-invariant init: the gathered weight is exactly what a dense init from the same seed gives.
            torch.manual_seed(42)
            ref_w = torch.empty(h_out, h_in)
            torch.nn.init.xavier_normal_(ref_w)
            assert torch.equal(dense_w, ref_w), "ColumnParallelLinear init is not TP-invariant"
            sl = (lambda t: t) if gather_output else (lambda t: _shard(t, -1))
            x_ref, x_in, w_ref, b_ref = _run_dense_and_parallel(col, dense_w, dense_b, x, x, sl, skip_bias_add, 0)
            _close(x_in.grad, x_ref.grad, "column input grad")
            _close(col.weight.grad, _shard(w_ref.grad, 0), "column weight grad")
            _close(col.bias.grad, _shard(b_ref.grad, 0), "column bias grad")
            assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0

    x2 = _same_on_all_ranks(8, 5, 2, h_out)
    for input_is_parallel in (False, True):
        for skip_bias_add in (False, True):
            torch.manual_seed(43)
            row = tp.RowParallelLinear(h_out, h_in, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                       bias=True, input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add)
            with torch.no_grad():
                row.bias.uniform_(-1, 1)
            dense_w, dense_b = _gather(row.weight.detach(), 1), row.bias.detach()
            torch.manual_seed(43)
            ref_w = torch.empty(h_in, h_out)
            torch.nn.init.xavier_normal_(ref_w)
            assert torch.equal(dense_w, ref_w), "RowParallelLinear init is not TP-invariant"
            x_in = _shard(x2, -1) if input_is_parallel else x2
            x_ref, x_in, w_ref, b_ref = _run_dense_and_parallel(row, dense_w, dense_b, x2, x_in, lambda t: t,
                                                                skip_bias_add, 1)
            _close(x_in.grad, _shard(x_ref.grad, -1) if input_is_parallel else x_ref.grad, "row input grad")
            _close(row.weight.grad, _shard(w_ref.grad, 1), "row weight grad")
            _close(row.bias.grad, b_ref.grad, "row bias grad")
            assert row.weight.partition_dim == 1 and not row.bias.tensor_model_parallel

    # Sequence parallel: column gathers [s/p] inputs, row reduce-scatters to [s/p] outputs.
    if world > 1:
        sp = ModelParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True)
        torch.manual_seed(44)
        col = tp.ColumnParallelLinear(h_in, h_out, config=sp, init_method=torch.nn.init.xavier_normal_)
        row = tp.RowParallelLinear(h_out, h_in, config=sp, init_method=torch.nn.init.xavier_normal_,
                                   input_is_parallel=True)
        xs = _same_on_all_ranks(9, 2 * world, 2, h_in)
        wc, wr = _gather(col.weight.detach(), 0).requires_grad_(), _gather(row.weight.detach(), 1).requires_grad_()
        x_ref = xs.clone().requires_grad_()
        y_ref = F.linear(F.linear(x_ref, wc), wr)
        y_ref.pow(2).sum().backward()
        x_in = _shard(xs, 0).requires_grad_()
        y = row(col(x_in)[0])[0]
        _close(y, _shard(y_ref.detach(), 0), "SP column->row output")
        y.pow(2).sum().backward()
        _close(x_in.grad, _shard(x_ref.grad, 0), "SP input grad")
        _close(col.weight.grad, _shard(wc.grad, 0), "SP column weight grad")
        _close(row.weight.grad, _shard(wr.grad, 1), "SP row weight grad")

    # VocabParallelEmbedding vs nn.Embedding.
    vocab, hidden = 8 * world, 6
    torch.manual_seed(45)
    emb = tp.VocabParallelEmbedding(vocab, hidden, init_method=torch.nn.init.normal_, config=cfg)
    full = _gather(emb.weight.detach(), 0)
    torch.manual_seed(45)
    ref_w = torch.empty(vocab, hidden)
    torch.nn.init.normal_(ref_w)
    assert torch.equal(full, ref_w), "VocabParallelEmbedding init is not TP-invariant"
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(3))
    ref = torch.nn.Embedding(vocab, hidden)
    with torch.no_grad():
        ref.weight.copy_(full)
    gy = _same_on_all_ranks(12, 3, 7, hidden)
    y_ref = ref(ids)
    (y_ref * gy).sum().backward()
    y = emb(ids)
    _close(y, y_ref.detach(), "embedding output")
    (y * gy).sum().backward()
    _close(emb.weight.grad, _shard(ref.weight.grad, 0), "embedding weight grad")


def _check_cross_entropy(world):
    s, b, vocab = 6, 3, 10 * world
    logits = _same_on_all_ranks(21, s, b, vocab) * 3
    target = torch.randint(0, vocab, (s, b), generator=torch.Generator().manual_seed(22))
    for ls in (0.0, 0.1):
        ref_logits = logits.double().clone().requires_grad_()
        logp = torch.log_softmax(ref_logits, dim=-1)
        q = torch.full_like(logp, ls / (vocab - 1))  # Megatron smoothing: target 1-ls, others ls/(V-1)
        q.scatter_(-1, target.unsqueeze(-1), 1.0 - ls)
        ref_loss = -(q * logp).sum(-1)
        if ls == 0.0:
            _close(ref_loss.float(), F.cross_entropy(logits.view(-1, vocab), target.view(-1),
                                                     reduction="none").view(s, b), "reference sanity")
        gl = _same_on_all_ranks(23, s, b).double()
        (ref_loss * gl).sum().backward()
        local = _shard(logits, -1).requires_grad_()
        loss = tp.vocab_parallel_cross_entropy(local, target, label_smoothing=ls)
        _close(loss, ref_loss.detach().float(), f"cross entropy loss (ls={ls})")
        (loss * gl.float()).sum().backward()
        _close(local.grad, _shard(ref_logits.grad.float(), -1), f"cross entropy grad (ls={ls})")


def _check_rng_and_checkpoint(world):
    tp.model_parallel_cuda_manual_seed(123)
    with tp.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    outside = torch.rand(4)
    gathered_in = _gather(inside.unsqueeze(0), 0)
    gathered_out = _gather(outside.unsqueeze(0), 0)
    assert torch.equal(gathered_out, outside.expand(world, 4)), "default stream must match across TP ranks"
    if world > 1:
        assert not torch.equal(gathered_in[0], gathered_in[1]), "model-parallel stream must differ per TP rank"

    cfg = ModelParallelConfig(tensor_model_parallel_size=world)
    torch.manual_seed(5)
    col = tp.ColumnParallelLinear(8, 4 * world, config=cfg, init_method=torch.nn.init.xavier_normal_)
    row = tp.RowParallelLinear(4 * world, 8, config=cfg, init_method=torch.nn.init.xavier_normal_,
                               input_is_parallel=True)

    def block(x):
        h = col(x)[0]
        with tp.get_cuda_rng_tracker().fork():
            h = F.dropout(h, p=0.5, training=True)  # inside the TP region
        out = row(F.gelu(h))[0]
        return F.dropout(out, p=0.3, training=True)  # outside: same mask on every TP rank

    x = _same_on_all_ranks(6, 5, 2, 8)
    grads = []
    for use_ckpt, distribute in ((False, False), (True, False), (True, True)):
        tp.model_parallel_cuda_manual_seed(77)
        col.zero_grad(), row.zero_grad()
        xi = x.clone().requires_grad_()
        y = tp.checkpoint(block, distribute, xi) if use_ckpt else block(xi)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad.clone(), col.weight.grad.clone(), row.weight.grad.clone()))
    for other in grads[1:]:
        for a, b_, name in zip(grads[0], other, ("output", "input grad", "col grad", "row grad")):
            assert torch.equal(a, b_), f"checkpointed {name} differs from no checkpointing"


def _check_broadcast_data(world):
    data = {"tokens": torch.arange(12).view(3, 4), "labels": torch.arange(5)}
    mine = data if ps.get_tensor_model_parallel_rank() == 0 else None
    out = tp.broadcast_data(["tokens", "labels"], mine, torch.int64)
    assert torch.equal(out["tokens"], data["tokens"]) and torch.equal(out["labels"], data["labels"])


def _tp_suite(rank, world):
    ps.initialize_model_parallel(world)
    _check_mappings(world)
    _check_layers(world)
    _check_cross_entropy(world)
    _check_rng_and_checkpoint(world)
    _check_broadcast_data(world)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tensor_parallel_suite(world):
    assert run_distributed(_tp_suite, world, timeout=180) == [True] * world


def _bad_sizes(rank, world):
    ps.initialize_model_parallel(world)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world)
    with pytest.raises(ValueError, match="output size"):
        tp.ColumnParallelLinear(4, 3, config=cfg, init_method=torch.nn.init.normal_)
    with pytest.raises(ValueError, match="vocabulary size"):
        tp.VocabParallelEmbedding(7, 4, init_method=torch.nn.init.normal_, config=cfg)


def test_indivisible_sizes_raise_clear_errors():
    run_distributed(_bad_sizes, 2)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ValueError, match="--sequence-parallel"):
        ModelParallelConfig(tensor_model_parallel_size=1, sequence_parallel=True)

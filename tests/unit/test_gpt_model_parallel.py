"""GPTModel across ranks: TP=2/4 (with and without sequence parallelism) and a PP=2 x TP=2 pipeline split
give the same logits, loss and (gathered) gradients as the TP=1 model from the same seed / weights.

All checks share one 4-rank spawn (process start-up dominates the cost).
"""

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.utils import split_for_rank
from megatron.core.transformer import TransformerConfig
from tests.multiprocess import run_distributed

V, H, HEADS, LAYERS, MAXPOS, S, B, SEED = 64, 32, 4, 4, 16, 8, 2, 4321
TOL = dict(rtol=1e-5, atol=2e-5)


def _config(tp=1, pp=1, **kw):
    return TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, hidden_dropout=0.0,
                             attention_dropout=0.0, tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, **kw)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _batch():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, V, (B, S + 1), generator=g).to(_device())
    position_ids = torch.arange(S, device=_device()).unsqueeze(0).expand(B, S)
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


def _tp_gather(param, tensor):
    """Global (TP=1) layout of a TP-sharded tensor (partition_dim of ``param``)."""
    if not getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def _global_grads(model, rename=lambda n: n):
    """Gradients in the TP=1 layout; sequence-parallel params' grads summed over TP first (as finalize does)."""
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        out[rename(name)] = _tp_gather(p, grad)
    return out


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _run(model, tokens, position_ids, labels):
    logits = model(tokens, position_ids, None)  # [b, s, V] (parallel_output=False)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, position_ids, None, labels=labels)  # [b, s]
    loss.sum().backward()
    return logits.detach(), loss.detach()


def _reference():
    parallel_state.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model = GPTModel(_config(), vocab_size=V, max_sequence_length=MAXPOS, parallel_output=False)
    logits, loss = _run(model, *_batch())
    ref = dict(logits=logits, loss=loss, grads=_global_grads(model),
               weights={n: p.detach().clone() for n, p in model.named_parameters()})
    parallel_state.destroy_model_parallel()
    return ref


def _check_tensor_parallel(ref, tp, extra):
    parallel_state.initialize_model_parallel(tp)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model = GPTModel(_config(tp=tp, **extra), vocab_size=V, max_sequence_length=MAXPOS, parallel_output=False)
    what = f"tp={tp} {extra}"
    for name, p in model.named_parameters():  # TP-invariant init: same global weights as TP=1
        _assert_close(_tp_gather(p, p.detach()), ref["weights"][name], f"{what} weight {name}")
    logits, loss = _run(model, *_batch())
    _assert_close(logits, ref["logits"], f"{what} logits")
    _assert_close(loss, ref["loss"], f"{what} loss")
    for name, grad in _global_grads(model).items():
        _assert_close(grad, ref["grads"][name], f"{what} grad {name}")
    parallel_state.destroy_model_parallel()


def _stage_name_to_global(name, offset):
    """Stage-local parameter name -> the TP=1, PP=1 model's name."""
    if name.startswith("word_embeddings_for_head."):
        return "language_model.embedding.word_embeddings.weight"
    if ".layers." in name:
        head, rest = name.split(".layers.", 1)
        index, tail = rest.split(".", 1)
        return f"{head}.layers.{int(index) + offset}.{tail}"
    return name


def _check_pipeline(ref):
    """PP=2 x TP=2 on 4 ranks; activations and grads passed between stages by hand (no schedule)."""
    parallel_state.initialize_model_parallel(2, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED + parallel_state.get_pipeline_model_parallel_rank())
    stage, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    tp_rank, rank = parallel_state.get_tensor_model_parallel_rank(), dist.get_rank()
    pre, post = stage == 0, stage == 1
    model = GPTModel(_config(tp=2, pp=2), vocab_size=V, max_sequence_length=MAXPOS, pre_process=pre,
                     post_process=post, parallel_output=False)
    offset = stage * (LAYERS // 2)
    keys = list(model.state_dict())
    assert {k.split(".layers.")[1].split(".")[0] for k in keys if ".layers." in k} == {"0", "1"}, keys
    assert [layer.layer_number for layer in model.language_model.encoder.layers] == [offset + 1, offset + 2]
    assert ("language_model.embedding.word_embeddings.weight" in keys) == pre
    assert ("language_model.encoder.final_layernorm.weight" in keys) == post
    assert ("word_embeddings_for_head.weight" in keys) == post
    # the last stage's head copy starts equal to the first stage's embedding (same TP rank)
    shared = model.shared_embedding_or_output_weight()
    assert getattr(shared, "shared_embedding", False)
    if pre:
        dist.send(shared.detach().contiguous(), dst=rank + 2)
    else:
        assert shared.shared
        first = torch.empty_like(shared)
        dist.recv(first, src=rank - 2)
        assert torch.equal(first, shared.detach()) and first.abs().sum() > 0

    rename = lambda n: _stage_name_to_global(n, offset)  # noqa: E731
    with torch.no_grad():  # load the reference weights, sharded for this TP rank
        for name, p in model.named_parameters():
            full = ref["weights"][rename(name)]
            if getattr(p, "tensor_model_parallel", False):
                full = split_for_rank(full, p.partition_dim, tp_rank, tp, p.partition_stride)
            p.copy_(full)

    tokens, position_ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    if pre:
        hidden = model(tokens, position_ids, None)  # [s, b, h]
        dist.send(hidden.detach().contiguous(), dst=rank + 2)
        grad = torch.empty_like(hidden)
        dist.recv(grad, src=rank + 2)
        hidden.backward(grad)
    else:
        hidden = torch.empty(S, B, H, device=_device())
        dist.recv(hidden, src=rank - 2)
        hidden.requires_grad_(True)
        model.set_input_tensor(hidden)
        loss = model(None, None, None, labels=labels)
        _assert_close(loss.detach(), ref["loss"], "pp=2 tp=2 loss")
        loss.sum().backward()
        dist.send(hidden.grad.contiguous(), dst=rank - 2)
    # the embedding-group all-reduce of the tied weight's grads (what the DP/grad code does each step)
    dist.all_reduce(shared.grad, group=parallel_state.get_embedding_group())
    for name, grad in _global_grads(model, rename).items():
        _assert_close(grad, ref["grads"][name], f"pp=2 tp=2 stage {stage} grad {name}")
    parallel_state.destroy_model_parallel()


def _suite(rank, world_size):
    ref = _reference()
    variants = [
        (2, {}), (2, dict(sequence_parallel=True)), (4, {}), (4, dict(sequence_parallel=True)),
        (2, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3,
                 distribute_saved_activations=True)),
        (2, dict(sequence_parallel=True, recompute_granularity="selective", use_flash_attn=True)),
        (4, dict(sequence_parallel=True, recompute_granularity="full", recompute_method="block",
                 recompute_num_layers=2)),
    ]
    for tp, extra in variants:
        _check_tensor_parallel(ref, tp, extra)
    _check_pipeline(ref)
    return len(variants)


def test_tensor_and_pipeline_parallel_match_single_rank():
    assert run_distributed(_suite, world_size=4, timeout=240) == [7] * 4

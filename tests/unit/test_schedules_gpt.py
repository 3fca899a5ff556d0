"""GPT under pipeline parallelism (one 2-rank spawn): PP-invariant initial weights (PP=2, and PP=2 x 2
virtual stages, equal to the PP=1 model's layers), and tied word embeddings on the first and last stage
that stay equal after every optimizer step of the 1F1B schedule with DDP, AdamW and grad clipping.
"""

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from tests.multiprocess import run_distributed

V, H, HEADS, LAYERS, S, B, SEED = 64, 16, 2, 4, 8, 2, 99


def _config(pp=1, vpp=None):
    return TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, hidden_dropout=0.0,
                             attention_dropout=0.0, pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp, seq_length=S)


def _build(pp, vpp=None):
    """This rank's chunks, built from the same generator state on every rank (as get_model does)."""
    chunks = []
    torch.manual_seed(SEED)
    for c in range(vpp or 1):
        if vpp:
            parallel_state.set_virtual_pipeline_model_parallel_rank(c)
        chunks.append(GPTModel(_config(pp, vpp), vocab_size=V, max_sequence_length=S,
                               pre_process=parallel_state.is_pipeline_first_stage(),
                               post_process=parallel_state.is_pipeline_last_stage()))
    if vpp:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def _global_name(chunk, name):
    """Map a stage-local state-dict key (layers.N restart per stage) to the PP=1 key."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(chunk.language_model.encoder.layers[int(parts[i])].layer_number - 1)
    return ".".join(parts)


def _check_init_matches_pp1(full, pp, vpp):
    parallel_state.initialize_model_parallel(1, pp, vpp)
    torch.manual_seed(1000 + dist.get_rank())  # a stage-dependent state elsewhere must not matter
    seen = set()
    for chunk in _build(pp, vpp):
        for name, tensor in chunk.state_dict().items():
            if name == "word_embeddings_for_head.weight":
                name = "language_model.embedding.word_embeddings.weight"  # synced from the first stage
            key = _global_name(chunk, name)
            torch.testing.assert_close(tensor, full[key], rtol=0, atol=0, msg=f"PP={pp} vpp={vpp}: {name}")
            seen.add(key)
    parallel_state.destroy_model_parallel()
    return seen


def _batches(n):
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, V, (n, B, S + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    positions = torch.arange(S).unsqueeze(0).expand(B, S)
    out = model(tokens, positions, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}
    return out, loss_func


def _tied_embeddings_stay_equal(steps=3, nmb=4):
    parallel_state.initialize_model_parallel(1, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    (model,) = _build(2)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.1), [ddp])
    config = model.config
    config.grad_scale_func = opt.scale_loss
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = lambda chunks: finalize_model_grads(chunks, config)
    weight = model.shared_embedding_or_output_weight()
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter(_batches(nmb)),
                                          model=[ddp], num_microbatches=nmb, seq_length=S, micro_batch_size=B)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        copies = [torch.empty_like(weight) for _ in range(2)]
        dist.all_gather(copies, weight.detach().contiguous(), group=parallel_state.get_embedding_group())
        assert torch.equal(copies[0], copies[1]), f"tied embeddings differ after step {step + 1}"
        losses.append([float(d["lm loss"]) for d in out])
    parallel_state.destroy_model_parallel()
    return losses


def _body(rank, world):
    parallel_state.initialize_model_parallel(1, 1)
    (full,) = _build(1)
    full = {k: v.clone() for k, v in full.state_dict().items()}
    parallel_state.destroy_model_parallel()
    seen = _check_init_matches_pp1(full, 2, None)
    seen_v = _check_init_matches_pp1(full, 2, 2)
    gathered = [None, None]
    dist.all_gather_object(gathered, (sorted(seen), sorted(seen_v)))
    for i in range(2):
        assert set(gathered[0][i]) | set(gathered[1][i]) == set(full), "some PP=1 weights were never built"
    return _tied_embeddings_stay_equal()


def test_pp_invariant_init_and_tied_embeddings_stay_equal():
    losses = run_distributed(_body, 2, timeout=180)
    assert losses[0] == [[]] * 3  # only the last stage reports losses
    assert len(losses[1]) == 3 and all(len(step) == 4 for step in losses[1])

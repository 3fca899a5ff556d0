"""Time one training step of our GPT (TP=1) against Hugging Face GPT2LMHeadModel with the same weights.

A step is forward (mean LM loss) + backward + AdamW update on one batch. Both models get identical
weights (ours converted with megatron.training.checkpoint_hf.megatron_to_hf), the losses are checked
to agree first, then each is timed over --iters steps after --warmup steps. Prints ms/step and the
ratio ours / HF (lower is better for us), measured in the same run on the same device.

    python benchmarks/bench_gpt_step.py                      # CPU, small GPT-2 shape
    python benchmarks/bench_gpt_step.py --hidden-size 768 --num-layers 12 --seq-length 1024  # GPT-2 small
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192, help="multiple of 128 so no padding is trimmed")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--use-flash-attn", action="store_true", help="our attention through SDPA")
    return p.parse_args()


def build_models(a, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.training.checkpoint_hf import megatron_to_hf

    parallel_state.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(num_layers=a.num_layers, hidden_size=a.hidden_size,
                            num_attention_heads=a.num_attention_heads, seq_length=a.seq_length,
                            max_position_embeddings=a.seq_length, hidden_dropout=0.0, attention_dropout=0.0,
                            bias_gelu_fusion=True, masked_softmax_fusion=True, use_flash_attn=a.use_flash_attn)
    ours = GPTModel(cfg, vocab_size=a.vocab_size, max_sequence_length=a.seq_length).to(device)
    hf_args = argparse.Namespace(num_attention_heads=a.num_attention_heads, num_layers=a.num_layers,
                                 hidden_size=a.hidden_size, ffn_hidden_size=4 * a.hidden_size,
                                 max_position_embeddings=a.seq_length, openai_gelu=False, bias_gelu_fusion=True,
                                 layernorm_epsilon=1e-5)
    sd, config = megatron_to_hf(ours.state_dict(), hf_args, a.vocab_size)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if k not in ("architectures",
                                                                                   "torch_dtype")}))
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    return ours.to(device), hf.to(device).train()


def _time(step, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_steps(steps, iters, warmup, device):
    """Median seconds per step of each callable, interleaved so background load hits both alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(iters):
        for i, step in enumerate(steps):
            times[i].append(_time(step, device))
    return [statistics.median(t) for t in times]


def main():
    a = parse()
    torch.set_num_threads(os.cpu_count() or 1)
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    ours, hf = build_models(a, a.device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), generator=g).to(a.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(a.seq_length, device=a.device).unsqueeze(0).expand_as(inputs)

    with torch.no_grad():
        ours_loss = ours(inputs, pos, None, labels=labels).mean().item()
        hf_loss = torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1).float(),
                                                    labels.flatten()).item()
    assert abs(ours_loss - hf_loss) < 1e-4 * max(1.0, abs(hf_loss)), (ours_loss, hf_loss)

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours():
        opt_ours.zero_grad(set_to_none=True)
        ours(inputs, pos, None, labels=labels).mean().backward()
        opt_ours.step()

    def step_hf():
        opt_hf.zero_grad(set_to_none=True)
        logits = hf(inputs).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
        opt_hf.step()

    t_ours, t_hf = timed_steps([step_ours, step_hf], a.iters, a.warmup, a.device)
    print(f"device={a.device} threads={torch.get_num_threads()} layers={a.num_layers} hidden={a.hidden_size} "
          f"heads={a.num_attention_heads} seq={a.seq_length} batch={a.micro_batch_size} vocab={a.vocab_size}")
    print(f"initial loss: ours {ours_loss:.6f}  HF {hf_loss:.6f}")
    print(f"train step (median of {a.iters}): ours {t_ours * 1e3:.1f} ms   HF GPT2LMHeadModel {t_hf * 1e3:.1f} ms")
    print(f"ratio ours/HF = {t_ours / t_hf:.3f}  (< 1 means ours is faster)")
    dist.destroy_process_group()
    os.unlink(store)


if __name__ == "__main__":
    main()

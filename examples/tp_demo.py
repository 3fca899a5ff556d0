"""Tiny tensor-parallel demo: a Column->Row parallel MLP on N ranks matches the dense computation.

Run: torchrun --nproc_per_node 2 examples/tp_demo.py
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig


def main():
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world)
    h, ffn = 16, 64
    fc1 = tensor_parallel.ColumnParallelLinear(h, ffn, config=cfg, init_method=torch.nn.init.xavier_normal_)
    fc2 = tensor_parallel.RowParallelLinear(ffn, h, config=cfg, init_method=torch.nn.init.xavier_normal_,
                                            input_is_parallel=True)
    x = torch.randn(8, 2, h, generator=torch.Generator().manual_seed(0))  # [s, b, h], same on every rank
    y = fc2(F.gelu(fc1(x)[0]))[0]

    # Dense reference from the gathered weights.
    w1 = tensor_parallel.gather_from_tensor_model_parallel_region(fc1.weight.detach().t()).t()
    w2 = tensor_parallel.gather_from_tensor_model_parallel_region(fc2.weight.detach())
    b1 = tensor_parallel.gather_from_tensor_model_parallel_region(fc1.bias.detach())
    ref = F.linear(F.gelu(F.linear(x, w1, b1)), w2, fc2.bias.detach())
    err = (y - ref).abs().max().item()
    if dist.get_rank() == 0:
        print(f"[tp_demo] TP={world}: shard of fc1.weight {tuple(fc1.weight.shape)} per rank, "
              f"full {tuple(w1.shape)}; max |parallel - dense| = {err:.2e}", flush=True)
    assert err < 1e-5
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

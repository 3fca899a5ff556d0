"""Pipeline-parallel checkpoints (one 4-rank spawn, fp32, dropout 0).

* A TP=2 x PP=2 run saved at iteration 3, resharded by tools/checkpoint_util.py to TP=1 x PP=1 and
  continued (DP=4) gives the same lm-loss at iterations 4-6 as the uninterrupted TP=2 x PP=2 run.
* The TP=2 x PP=2 checkpoint exported by tools/convert_checkpoint_to_hf.py gives Hugging Face
  GPT2LMHeadModel logits equal to our TP=1 GPTModel holding the merged weights of that checkpoint.
"""

import os

import pytest
import torch

from tests.multiprocess import run_distributed

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--vocab-size", "200", "--make-vocab-size-divisible-by", "8",
        "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--lr-decay-style", "constant", "--log-interval", "100", "--eval-interval", "1000", "--eval-iters", "0",
        "--seed", "11", "--clip-grad", "1.0", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "6"]
TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def _pretrain(flags):
    import pretrain_gpt
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import ModelType
    from megatron.training import pretrain

    try:
        hist = pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                        ModelType.encoder_or_decoder, pretrain_gpt.forward_step, args_list=TINY + list(flags))
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    return [float(x) for x in hist["lm loss"] if x is not None]


def _body(rank, world, tmp):
    import torch.distributed as dist

    from tools.checkpoint_util import reshard

    src, dst = os.path.join(tmp, "tp2pp2"), os.path.join(tmp, "tp1pp1")
    full = _pretrain(TP2PP2)
    first = _pretrain(TP2PP2 + ["--save", src, "--exit-interval", "3"])
    if rank == 0:
        reshard(src, dst, 1, 1)
    dist.barrier()
    resumed = _pretrain(["--load", dst, "--no-load-rng"])
    return {"full": full, "first": first, "resumed": resumed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ppckpt"))
    return tmp, run_distributed(_body, 4, args=(tmp,), timeout=300)


def test_pp2_checkpoint_resharded_to_pp1_gives_same_loss(runs):
    _, results = runs
    last = results[-1]
    assert len(last["full"]) == 6 and len(last["first"]) == 3 and len(last["resumed"]) == 3
    for i, (a, b) in enumerate(zip(last["first"] + last["resumed"], last["full"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i + 1}: {a} vs uninterrupted TP=2 x PP=2 {b}"


def test_tp2pp2_checkpoint_exports_to_hf_with_equal_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch.distributed as dist

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.training.checkpoint_conversion import load_global_checkpoint
    from tests.multiprocess import find_free_port
    from tools.convert_checkpoint_to_hf import export

    tmp, _ = runs
    src = os.path.join(tmp, "tp2pp2")
    out = export(src, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    ckpt = load_global_checkpoint(src)
    assert (ckpt.args.tensor_model_parallel_size, ckpt.args.pipeline_model_parallel_size) == (2, 2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                                   attention_dropout=0.0, openai_gelu=ckpt.args.openai_gelu)
        ours = GPTModel(config, vocab_size=ckpt.args.padded_vocab_size, max_sequence_length=16,
                        parallel_output=False).eval()
        ours.load_state_dict(ckpt.model)
        tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = ours(tokens, torch.arange(16).expand(2, 16), None)[..., :200]
            actual = hf(tokens).logits[..., :200]
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()

"""Checkpoint acceptance through pretrain_gpt on 4 gloo ranks (TP=2 x DP=2), one spawn for all runs.

* resume bit-exactness, fp32 and fp16 (dynamic loss scaler): k iterations + save, resume to n, the
  losses equal an uninterrupted n-iteration run exactly;
* reshard TP=2 -> TP=1 -> TP=4 (with optimizer state) and continue: losses equal the unresharded run;
* --finetune starts at iteration 0 from the saved weights; a TP mismatch is one clear error.
"""

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

from tests.multiprocess import run_distributed

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--vocab-size", "200", "--make-vocab-size-divisible-by", "64",
        "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--log-interval", "100", "--eval-interval", "1000",
        "--eval-iters", "0", "--seed", "11", "--clip-grad", "1.0", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "6"]
FP16 = ["--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "2", "--hysteresis", "1"]


def _pretrain(flags):
    import pretrain_gpt
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import ModelType
    from megatron.training import pretrain

    try:
        return pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                        ModelType.encoder_or_decoder, pretrain_gpt.forward_step, args_list=TINY + list(flags))
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def _losses(hist):
    return [float(x) for x in hist["lm loss"]] if hist["lm loss"] and hist["lm loss"][0] is not None else []


def _body(rank, world, tmp):
    import torch.distributed as dist


    root = __import__("tools.checkpoint_util", fromlist=["reshard"])
    out = {}
    tp2 = ["--tensor-model-parallel-size", "2"]
    for name, prec in (("fp32", []), ("fp16", FP16)):
        d = os.path.join(tmp, name)
        out[f"{name}_full"] = _losses(_pretrain(tp2 + prec))
        out[f"{name}_first"] = _losses(_pretrain(tp2 + prec + ["--save", d, "--exit-interval", "3"]))
        out[f"{name}_resumed"] = _losses(_pretrain(tp2 + prec + ["--load", d]))
        out[f"{name}_scales"] = [float(x) for x in _pretrain(tp2 + prec + ["--load", d])["loss scale"]]
    # Reshard chain: TP=2 (iter 3) -> TP=1, run to 4 -> TP=4, run to 6.
    src, d1, d4 = os.path.join(tmp, "fp32"), os.path.join(tmp, "tp1"), os.path.join(tmp, "tp4")
    if rank == 0:
        root.reshard(src, d1, 1, 1)
    dist.barrier()
    out["tp1"] = _losses(_pretrain(["--load", d1, "--no-load-rng", "--save", d1, "--exit-interval", "4"]))
    if rank == 0:
        root.reshard(d1, d4, 4, 1)
    dist.barrier()
    out["tp4"] = _losses(_pretrain(["--tensor-model-parallel-size", "4", "--load", d4, "--no-load-rng"]))
    # --finetune: weights only, iteration 0 -> trains all 6 iterations.
    out["finetune_iters"] = len(_pretrain(tp2 + ["--load", src, "--finetune"])["iteration"])
    stderr = io.StringIO()
    try:  # pretrain turns the CheckpointError into one stderr line and exit status 2
        with contextlib.redirect_stderr(stderr):
            _pretrain(["--load", src])
        out["mismatch"] = None
    except SystemExit as err:
        out["mismatch"] = stderr.getvalue() if err.code == 2 else f"exit status {err.code}"
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ckpt"))
    out = run_distributed(_body, 4, args=(tmp,), timeout=400)[-1]
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("prec", ["fp32", "fp16"])
def test_resume_is_bit_exact(results, prec):
    full, first, resumed = results[f"{prec}_full"], results[f"{prec}_first"], results[f"{prec}_resumed"]
    assert len(full) == 6 and len(first) == 3 and len(resumed) == 3
    assert first + resumed == full  # exact equality, not approximate
    if prec == "fp16":
        assert len(set(results["fp16_scales"])) > 1  # the loss scale moved after the resume point too


def test_reshard_tp2_tp1_tp4_continues_identically(results):
    full = results["fp32_full"]
    resharded = results["fp32_first"] + results["tp1"] + results["tp4"]
    assert len(resharded) == 6
    for i, (a, b) in enumerate(zip(resharded, full)):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i + 1}: {a} vs unresharded {b}"


def test_finetune_and_layout_mismatch(results):
    assert results["finetune_iters"] == 6
    msg = results["mismatch"]
    assert msg is not None and "tensor-parallel size 2" in msg and "tools/checkpoint_util.py" in msg


_PLAIN = """
import argparse, sys
import numpy, torch
src, dst = sys.argv[1], sys.argv[2]
raw = torch.load(src, map_location="cpu", weights_only=False)
core = getattr(numpy, "_core", None) or numpy.core
allow = [argparse.Namespace, core.multiarray._reconstruct, numpy.ndarray, numpy.dtype, numpy.dtypes.UInt32DType]
with torch.serialization.safe_globals(allow):
    state = torch.load(src, map_location="cpu", weights_only=True)
assert sorted(raw) == sorted(state)
assert not [m for m in sys.modules if m.split(".")[0] in ("megatron", "tools")], "megatron was imported"
torch.save(state, dst)
"""


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__array__"):
        assert (a == b).all(), where
    elif hasattr(a, "__dict__"):
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def test_checkpoint_round_trips_through_plain_torch_load(results, tmp_path):
    from megatron.training.checkpoint_io import safe_load

    for prec in ("fp32", "fp16"):
        src = os.path.join(results["tmp"], prec, "iter_0000003", "mp_rank_01", "model_optim_rng.pt")
        dst = str(tmp_path / f"{prec}.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run = subprocess.run([sys.executable, "-c", _PLAIN, src, dst], capture_output=True, text=True,
                             cwd=str(tmp_path), env=env, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        original, copied = safe_load(src), safe_load(dst)
        assert original["checkpoint_version"] == 3.0 and original["iteration"] == 3
        assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "args"} <= set(original)
        for field in ("padded_vocab_size", "max_position_embeddings", "hidden_size", "num_layers",
                      "num_attention_heads", "ffn_hidden_size", "tensor_model_parallel_size",
                      "pipeline_model_parallel_size", "make_vocab_size_divisible_by", "tokenizer_type",
                      "bias_gelu_fusion", "openai_gelu", "params_dtype", "seq_length"):
            assert hasattr(original["args"], field), field
        assert len(original["rng_state"]) == 2  # one per data-parallel rank
        _assert_same(original, copied)

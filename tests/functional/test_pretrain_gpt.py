"""pretrain_gpt.py end to end on mock data: TP/DP equivalence, falling loss, grad norm, flags, log format."""

import math
import os
import re
import subprocess
import sys

import pytest

from tests.multiprocess import find_free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--vocab-size", "200", "--make-vocab-size-divisible-by", "8",
        "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--seed", "7", "--clip-grad", "1.0"]


def _pretrain(rank, world, extra, base=TINY):
    """pretrain_gpt in-process with ``base + extra`` flags; returns the history (ranks spawned by the harness)."""
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training import pretrain

    return pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                    ModelType.encoder_or_decoder, pretrain_gpt.forward_step, args_list=list(base) + list(extra))


def _history(world, extra):
    return run_distributed(_pretrain, world, args=(extra,), timeout=240)[-1]  # the last rank logs the loss


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def tp1_reference():
    return _history(1, ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10"])


@pytest.mark.parametrize("world,extra", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, []),  # DP=2
    (4, ["--tensor-model-parallel-size", "2"]),  # TP=2 x DP=2
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
], ids=["tp2", "dp2", "tp2xdp2", "tp2-sp"])
def test_parallel_losses_and_grad_norms_equal_tp1(tp1_reference, world, extra):
    hist = _history(world, ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10"] + extra)
    assert len(hist["lm loss"]) == 10
    for i, (a, b) in enumerate(zip(hist["lm loss"], tp1_reference["lm loss"])):
        assert _rel(a, b) < 1e-5, f"iteration {i + 1}: lm loss {a} vs TP=1 {b}"
    for i, (a, b) in enumerate(zip(hist["grad norm"], tp1_reference["grad norm"])):
        assert _rel(a, b) < 1e-5, f"iteration {i + 1}: grad norm {a} vs TP=1 {b}"


def test_loss_falls_on_learnable_mock_data():
    hist = _history(1, ["--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "50",
                        "--lr", "3e-3"])
    first, last = hist["lm loss"][0], sum(hist["lm loss"][-5:]) / 5
    assert first > math.log(200) - 0.5, first  # starts near uniform over the vocabulary
    assert last < first - 1.0, f"loss did not fall: {first} -> {last}"


def test_flops_formula_matches_hand_computation():
    from types import SimpleNamespace

    from megatron.training.utils import num_floating_point_operations

    B, s, L, h, V = 8, 1024, 24, 1024, 51200
    args = SimpleNamespace(seq_length=s, num_layers=L, hidden_size=h, ffn_hidden_size=4 * h, padded_vocab_size=V,
                           recompute_granularity=None)
    by_hand = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))  # DESIGN.md / Megatron paper
    assert _rel(num_floating_point_operations(args, B), by_hand) < 1e-12
    args.recompute_granularity = "full"  # one more forward through the layers
    layers_fwd = 24 * B * s * L * h * h * (1 + s / (6 * h))
    assert _rel(num_floating_point_operations(args, B), by_hand + layers_fwd) < 1e-12


def test_log_line_is_megatron_format():
    from megatron.training.training_log import evaluation_line, format_iteration_line

    line = format_iteration_line(10, 100, 320, 812.3, 1.2, 403.5, 1.5e-4, 32, {"lm loss": 7.123456}, 1.0, 2.345,
                                 None, 0, 0, timestamp="2026-11-22 10:00:00")
    assert line == (" [2026-11-22 10:00:00] iteration       10/     100 | consumed samples:          320 | "
                    "elapsed time per iteration (ms): 812.3 | throughput per GPU (TFLOP/s/GPU): 1.2 | "
                    "tokens per second per GPU: 403.5 | learning rate: 1.500000E-04 | global batch size:    32 | "
                    "lm loss: 7.123456E+00 | loss scale: 1.0 | grad norm: 2.345 | "
                    "number of skipped iterations:   0 | number of nan iterations:   0 |")
    v = evaluation_line("iteration 5", {"lm loss": 2.0})
    assert v == f" validation loss at iteration 5 | lm loss value: 2.000000E+00 | lm loss PPL: {math.exp(2):.6E} | "


@pytest.mark.parametrize("extra,message", [
    (["--num-attention-heads", "3", "--tensor-model-parallel-size", "2"], "--num-attention-heads"),
    (["--seq-length", "64"], "--seq-length"),
    (["--global-batch-size", "3"], "--global-batch-size"),
    (["--fp16", "--bf16"], "mutually exclusive"),
    (["--ffn-hidden-size", "33", "--tensor-model-parallel-size", "2"], "--ffn-hidden-size"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "5"],
     "--recompute-num-layers"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    (["--vocab-size", "0"], "--vocab-size must be > 0"),
    (["--data-path", "a", "--valid-data-path", "x"], "not both"),
])
def test_bad_flags_are_one_clear_error(extra, message):
    from megatron.training.arguments import ArgumentError, parse_args, validate_args

    args = parse_args(args_list=TINY + ["--micro-batch-size", "2", "--train-iters", "5"] + extra)
    with pytest.raises(ArgumentError, match=re.escape(message)):
        validate_args(args, world_size=2)


def test_missing_data_is_a_clear_error():
    from megatron.training.arguments import ArgumentError, parse_args, validate_args

    flags = [f for f in TINY if f != "--mock-data"] + ["--micro-batch-size", "2", "--train-iters", "5"]
    with pytest.raises(ArgumentError, match="--data-path"):
        validate_args(parse_args(args_list=flags), world_size=1)


def test_cli_under_torchrun_prints_megatron_log_lines(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(find_free_port()),
           os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--tensor-model-parallel-size", "2",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "2",
           "--eval-interval", "2", "--eval-iters", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "iteration" in ln and "lm loss:" in ln]
    assert len(lines) == 2, out.stdout
    assert re.search(r"iteration\s+4/\s+4 \| consumed samples:\s+16 \|", lines[-1])
    assert "validation loss at iteration 2 | lm loss value:" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--micro-batch-size", "2",
                          "--train-iters", "2", "--num-attention-heads", "5"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "--num-attention-heads" in bad.stderr and "Traceback" not in bad.stderr
    helptext = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--help"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert helptext.returncode == 0 and "--tensor-model-parallel-size" in helptext.stdout


@pytest.mark.parametrize("precision", [["--fp16", "--initial-loss-scale", "4096"], ["--bf16"]], ids=["fp16", "bf16"])
def test_mixed_precision_with_fp32_residual_trains_at_tp2(precision):
    hist = _history(2, ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "12",
                        "--tensor-model-parallel-size", "2", "--fp32-residual-connection", "--lr", "3e-3"]
                    + precision)
    losses = [v for v in hist["lm loss"] if v is not None]
    assert len(losses) >= 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses


def test_nan_iterations_are_counted_and_kept_out_of_the_average(capsys):
    from types import SimpleNamespace

    import torch

    from megatron.training.training_log import TrainingLogger

    args = SimpleNamespace(iteration=0, log_interval=3, tensorboard_log_interval=1, log_params_norm=False,
                           seq_length=8, num_layers=1, hidden_size=8, ffn_hidden_size=32, padded_vocab_size=16,
                           global_batch_size=2, world_size=1, train_iters=3, consumed_train_samples=6)
    logger = TrainingLogger(args)
    for it, loss in enumerate([2.0, float("nan"), 4.0], start=1):
        logger.record(it, {"lm loss": torch.tensor(loss)}, 1e-3, 1.0, 1.0, None, 0, model=[])
    line = capsys.readouterr().out
    assert "lm loss: 3.000000E+00" in line and "number of nan iterations:   1" in line

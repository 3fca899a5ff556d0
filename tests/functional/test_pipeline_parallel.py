"""Pipeline parallelism end to end (pretrain_gpt on mock data, fp32, dropout 0, several micro-batches).

Acceptance of issue 8: the lm-loss (and grad norm) of 10 iterations at PP=2, PP=4, TP=2 x PP=2,
PP=2 x DP=2 and the interleaved schedule (PP=2 x 2 virtual stages) equals PP=1 to 1e-5 relative.
The loss line is printed once per logged iteration, by the last rank. Bad layouts are one clear error.
"""

import contextlib
import io
import re

import pytest

from tests.multiprocess import run_distributed

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--vocab-size", "200", "--make-vocab-size-divisible-by", "8",
        "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "5", "--eval-iters", "1",
        "--seed", "11", "--clip-grad", "1.0", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "10"]


def _pretrain(rank, world, extra):
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        hist = pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                        ModelType.encoder_or_decoder, pretrain_gpt.forward_step, args_list=TINY + list(extra))
    text = out.getvalue()
    return {"history": {k: hist[k] for k in ("lm loss", "grad norm", "valid")},
            "loss_lines": len(re.findall(r"iteration\s+\d+/\s+10 \|.*lm loss: ", text)),
            "valid_lines": text.count("validation loss at iteration 5 | lm loss value:")}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def pp1_reference():
    return run_distributed(_pretrain, 1, args=([],), timeout=240)[0]["history"]


@pytest.mark.parametrize("world,extra", [
    (2, ["--pipeline-model-parallel-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "4"]),
    (4, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"]),
    (4, ["--pipeline-model-parallel-size", "2"]),  # DP=2
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
], ids=["pp2", "pp4", "tp2xpp2", "pp2xdp2", "pp2-interleaved"])
def test_pipeline_losses_and_grad_norms_equal_pp1(pp1_reference, world, extra):
    results = run_distributed(_pretrain, world, args=(extra,), timeout=240)
    hist = results[-1]["history"]
    assert len(hist["lm loss"]) == 10
    for i, (a, b) in enumerate(zip(hist["lm loss"], pp1_reference["lm loss"])):
        assert _rel(a, b) < 1e-5, f"iteration {i + 1}: lm loss {a} vs PP=1 {b}"
    for i, (a, b) in enumerate(zip(hist["grad norm"], pp1_reference["grad norm"])):
        assert _rel(a, b) < 1e-5, f"iteration {i + 1}: grad norm {a} vs PP=1 {b}"
    assert _rel(hist["valid"]["lm loss"], pp1_reference["valid"]["lm loss"]) < 1e-5  # forward-only schedule
    # The loss is printed once per iteration, by the last rank only (it is on the last stage).
    assert [r["loss_lines"] for r in results] == [0] * (world - 1) + [10]
    assert [r["valid_lines"] for r in results] == [0] * (world - 1) + [1]


@pytest.mark.parametrize("world,extra,message", [
    (3, ["--pipeline-model-parallel-size", "2"],
     "world size (3) is not divisible by --tensor-model-parallel-size (1) x --pipeline-model-parallel-size (2)"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "layers per pipeline stage (2) must be divisible by --num-layers-per-virtual-pipeline-stage (3)"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
         "--global-batch-size", "6"],
     "number of micro-batches (3) to be divisible by --pipeline-model-parallel-size (2)"),
    (1, ["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
])
def test_bad_pipeline_layouts_are_one_clear_error(world, extra, message):
    from megatron.training.arguments import ArgumentError, parse_args, validate_args

    with pytest.raises(ArgumentError, match=re.escape(message)):
        validate_args(parse_args(args_list=TINY + extra), world_size=world)


def test_transformer_config_rejects_uneven_split():
    from megatron.core.transformer import TransformerConfig

    with pytest.raises(ValueError, match=re.escape("--num-layers (3) must be divisible by "
                                                   "--pipeline-model-parallel-size (2)")):
        TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=2)

"""--use-checkpoint-args: the model flags come from the checkpoint, so a resume needs none of them."""

from tests.functional.test_pretrain_gpt import TINY, _pretrain
from tests.multiprocess import run_distributed

MODEL_FLAGS = {"--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--max-position-embeddings"}


def _without_model_flags(flags):
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in MODEL_FLAGS:
            skip = True
            continue
        out.append(f)
    return out


def test_resume_with_model_flags_from_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    common = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr-decay-style", "constant",
              "--lr-decay-iters", "10"]
    first = run_distributed(_pretrain, 1, args=(common + ["--train-iters", "2", "--save", save],), timeout=180)[0]
    assert first["iteration"] == [1, 2]
    # The second run names no model size at all: TINY without them, plus --use-checkpoint-args.
    flags = _without_model_flags(TINY) + common + ["--train-iters", "3", "--load", save, "--use-checkpoint-args",
                                                      "--use-checkpoint-opt_param-scheduler"]
    assert "--hidden-size" not in flags
    second = run_distributed(_resume_without_tiny, 1, args=(flags,), timeout=180)[0]
    assert second["iteration"] == [3] and second["lm loss"][0] > 0


def _resume_without_tiny(rank, world, flags):
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training import pretrain

    return pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                    ModelType.encoder_or_decoder, pretrain_gpt.forward_step, args_list=flags)

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
    second = run_distributed(_pretrain, 1, args=(flags, ()), timeout=180)[0]
    assert second["iteration"] == [3] and second["lm loss"][0] > 0


def _two_runs(rank, world, save, total, stop):
    """An uninterrupted run of ``total`` iterations, and one stopped at ``stop`` then resumed to ``total``."""
    import os

    from tests.functional.test_pretrain_gpt import _pretrain as run

    common = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(total),
              "--eval-interval", "1", "--eval-iters", "1", "--split", "90,10,0"]
    full = run(rank, world, common)
    part = run(rank, world, common + ["--save", save, "--exit-interval", str(stop)])
    resumed = run(rank, world, common + ["--save", save, "--load", save])
    again = run(rank, world, common + ["--save", save, "--load", save])  # already finished: nothing to do
    return {"full": full, "part": part, "resumed": resumed, "again": again,
            "saved": sorted(os.listdir(save))}


def test_resume_continues_validation_and_a_finished_run_is_a_no_op(tmp_path):
    out = run_distributed(_two_runs, 1, args=(str(tmp_path / "ckpt"), 4, 2), timeout=240)[0]
    assert out["resumed"]["iteration"] == [3, 4]
    assert out["part"]["lm loss"] + out["resumed"]["lm loss"] == out["full"]["lm loss"]
    # Validation batches continue where the stopped run left off, so the values match the uninterrupted run.
    assert out["part"]["validation"] + out["resumed"]["validation"] == out["full"]["validation"]
    assert out["again"]["iteration"] == []
    assert out["saved"] == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]

"""Resharder: any TP/PP -> any TP/PP against hand-built expectations (DESIGN.md keys/shapes), QKV heads,
vocabulary re-padding, tied word_embeddings_for_head, optimizer state carried by name."""

import argparse

import pytest
import torch

from megatron.training.checkpoint_conversion import (
    GlobalCheckpoint,
    flatten_model_state,
    load_global_checkpoint,
    padded_vocab_size,
    repad_global,
    split_global_checkpoint,
)
from megatron.training.checkpoint_io import CheckpointError, safe_load, save_sharded_checkpoint

H, HEADS, L, FFN, POS, TRUE_V, DIV = 8, 4, 4, 32, 6, 21, 4
LAYER = ["input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight",
         "self_attention.query_key_value.bias", "self_attention.dense.weight", "self_attention.dense.bias",
         "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
         "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]


def _shape(name, vpad):
    return {"word_embeddings.weight": (vpad, H), "position_embeddings.weight": (POS, H),
            "query_key_value.weight": (3 * H, H), "query_key_value.bias": (3 * H,),
            "self_attention.dense.weight": (H, H), "dense_h_to_4h.weight": (FFN, H), "dense_h_to_4h.bias": (FFN,),
            "dense_4h_to_h.weight": (H, FFN), "output_layer.weight": (vpad, H)}.get(
                next((k for k in ("word_embeddings.weight", "position_embeddings.weight", "query_key_value.weight",
                                  "query_key_value.bias", "self_attention.dense.weight", "dense_h_to_4h.weight",
                                  "dense_h_to_4h.bias", "dense_4h_to_h.weight", "output_layer.weight")
                      if name.endswith(k)), ""), (H,))


def _global(tied=True, tp=1, fp16=False):
    vpad = padded_vocab_size(TRUE_V, DIV, tp)
    keys = ["language_model.embedding.word_embeddings.weight", "language_model.embedding.position_embeddings.weight"]
    keys += [f"language_model.encoder.layers.{i}.{k}" for i in range(L) for k in LAYER]
    keys += ["language_model.encoder.final_layernorm.weight", "language_model.encoder.final_layernorm.bias"]
    if not tied:
        keys.append("language_model.output_layer.weight")
    g = torch.Generator().manual_seed(0)
    model = {k: torch.randn(_shape(k, vpad), generator=g) for k in keys}
    optim = {}
    for k, v in model.items():
        wd = 0.0 if (k.endswith(".bias") or v.dim() == 1) else 1.0
        optim[k] = {"group": {"lr": 1e-3, "weight_decay": 0.1 * wd, "wd_mult": wd, "lr_mult": 1.0},
                    "state": {"step": torch.tensor(5.0), "exp_avg": torch.randn(v.shape, generator=g),
                              "exp_avg_sq": torch.rand(v.shape, generator=g)},
                    "master": v.clone() if fp16 else None}
    args = argparse.Namespace(num_layers=L, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                              max_position_embeddings=POS, padded_vocab_size=vpad, true_vocab_size=TRUE_V,
                              make_vocab_size_divisible_by=DIV, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=1, params_dtype=torch.float32)
    return GlobalCheckpoint(args=args, model=model, iteration=5, optimizer=optim,
                            optimizer_extra={"fp16": fp16, "grad_scaler": {"scale": torch.tensor(8.0)}},
                            opt_param_scheduler={"num_steps": 40}, extra={"consumed_train_samples": 40})


def test_stage_keys_and_shapes_follow_design_md(tmp_path):
    ckpt = _global(tied=True, tp=2)
    shards = split_global_checkpoint(ckpt, tp=2, pp=2)
    assert set(shards) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    first, last = (flatten_model_state(shards[(1, p)]["model"]) for p in (0, 1))
    vpad = ckpt.args.padded_vocab_size
    assert list(first)[:2] == ["language_model.embedding.word_embeddings.weight",
                               "language_model.embedding.position_embeddings.weight"]
    assert first["language_model.embedding.word_embeddings.weight"].shape == (vpad // 2, H)
    assert [k for k in last if "layers." in k] == [f"language_model.encoder.layers.{i}.{k}" for i in range(2)
                                                   for k in LAYER]  # stage-local numbering restarts at 0
    assert list(last)[-3:] == ["language_model.encoder.final_layernorm.weight",
                               "language_model.encoder.final_layernorm.bias", "word_embeddings_for_head.weight"]
    assert last["language_model.encoder.layers.0.self_attention.dense.weight"].shape == (H, H // 2)
    assert last["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"].shape == (FFN // 2, H)
    # word_embeddings_for_head on the last stage equals the TP rank's slice of the embedding
    torch.testing.assert_close(last["word_embeddings_for_head.weight"],
                               ckpt.model["language_model.embedding.word_embeddings.weight"][vpad // 2:])
    # QKV: TP rank 1 holds whole heads 2,3 of the per-head [heads, 3, head_dim] layout
    qkv = ckpt.model["language_model.encoder.layers.2.self_attention.query_key_value.weight"].view(HEADS, 3, -1, H)
    torch.testing.assert_close(last["language_model.encoder.layers.0.self_attention.query_key_value.weight"],
                               qkv[2:].reshape(-1, H))
    # nested Megatron dicts
    assert "weight" in shards[(0, 1)]["model"]["word_embeddings_for_head"]
    assert "layers.0.input_layernorm.weight" in shards[(0, 1)]["model"]["language_model"]["encoder"]


@pytest.mark.parametrize("tied,fp16", [(True, False), (False, True)])
def test_reshard_round_trip_tp2pp2_to_tp4pp1_to_tp1pp4(tmp_path, tied, fp16):
    ckpt = _global(tied=tied, tp=1, fp16=fp16)
    vpad1 = ckpt.args.padded_vocab_size
    save_sharded_checkpoint(str(tmp_path / "a"), 5, split_global_checkpoint(ckpt, 2, 2), 2)
    g = load_global_checkpoint(str(tmp_path / "a"))
    save_sharded_checkpoint(str(tmp_path / "b"), 5, split_global_checkpoint(g, 4, 1), 1)
    g = load_global_checkpoint(str(tmp_path / "b"))
    repad_global(g, 1)
    save_sharded_checkpoint(str(tmp_path / "c"), 5, split_global_checkpoint(g, 1, 4), 4)
    back = load_global_checkpoint(str(tmp_path / "c"))
    assert list(back.model) == list(ckpt.model) and back.iteration == 5
    assert back.args.padded_vocab_size == vpad1
    for k, v in ckpt.model.items():
        assert torch.equal(back.model[k], v), k
        for s in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back.optimizer[k]["state"][s], ckpt.optimizer[k]["state"][s]), (k, s)
        if fp16:
            assert torch.equal(back.optimizer[k]["master"], v)
    raw = safe_load(str(tmp_path / "c" / "iter_0000005" / "mp_rank_00_003" / "model_optim_rng.pt"))
    assert raw["opt_param_scheduler"] == {"num_steps": 40} and raw["consumed_train_samples"] == 40
    names = raw["optimizer_param_names"]
    assert names[0][0] == "language_model.encoder.layers.0.input_layernorm.weight"  # no-wd group first here
    if fp16:
        assert float(raw["optimizer"]["grad_scaler"]["scale"]) == 8.0
        assert len(raw["optimizer"]["fp32_from_fp16_params"][0]) == len(names[0])


def test_vocab_is_repadded_for_the_new_tp():
    ckpt = _global(tied=False, tp=1)  # 21 -> 24 rows at TP=1 (multiple of 4)
    emb = ckpt.model["language_model.embedding.word_embeddings.weight"].clone()
    repad_global(ckpt, 4)  # TP=4: multiple of 16 -> 32 rows
    new = ckpt.model["language_model.embedding.word_embeddings.weight"]
    assert new.shape[0] == 32 == ckpt.args.padded_vocab_size
    assert torch.equal(new[:TRUE_V], emb[:TRUE_V])
    assert torch.equal(new[TRUE_V:], emb[TRUE_V - 1].expand(32 - TRUE_V, H))  # Megatron: copies of the last row
    assert torch.equal(ckpt.optimizer["language_model.output_layer.weight"]["state"]["exp_avg"][TRUE_V:],
                       torch.zeros(32 - TRUE_V, H))
    shards = split_global_checkpoint(ckpt, 4, 1)
    assert flatten_model_state(shards[(3, 0)]["model"])["language_model.output_layer.weight"].shape == (8, H)


def test_bad_targets_are_clear_errors():
    ckpt = _global()
    with pytest.raises(CheckpointError, match="num-attention-heads"):
        split_global_checkpoint(ckpt, 3, 1)
    with pytest.raises(CheckpointError, match="num-layers"):
        split_global_checkpoint(ckpt, 1, 3)
    ckpt.args.true_vocab_size = None
    with pytest.raises(CheckpointError, match="--true-vocab-size"):
        repad_global(ckpt, 5)


def test_unknown_true_vocab_refuses_a_repad_and_the_flags_fix_it(tmp_path, capsys):
    """A Megatron-LM checkpoint stores no true vocab size: TP=4 (32 rows) -> TP=1 must not keep 32 rows
    (training at TP=1 pads 21 tokens to 24); the tool refuses in one line until told the size."""
    import json

    from megatron.training.tokenizer import vocab_size_with_padding
    from tools.checkpoint_util import main

    ckpt = _global(tied=False, tp=4)
    del ckpt.args.true_vocab_size
    emb = ckpt.model["language_model.embedding.word_embeddings.weight"].clone()
    src = str(tmp_path / "src")
    save_sharded_checkpoint(src, 5, split_global_checkpoint(ckpt, 4, 1), 1)
    base = ["--load", src, "--target-tensor-parallel-size", "1"]
    assert main(base + ["--save", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--true-vocab-size" in err and "--vocab-file" in err and "TP=1" in err
    assert not (tmp_path / "x").exists()
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({f"t{i}": i for i in range(TRUE_V)}))
    for name, flags in (("a", ["--true-vocab-size", str(TRUE_V)]), ("b", ["--vocab-file", str(vocab)])):
        assert main(base + ["--save", str(tmp_path / name)] + flags) == 0
        back = load_global_checkpoint(str(tmp_path / name))
        new = back.model["language_model.embedding.word_embeddings.weight"]
        assert new.shape[0] == back.args.padded_vocab_size == vocab_size_with_padding(TRUE_V, DIV, 1) == 24
        assert torch.equal(new[:TRUE_V], emb[:TRUE_V]) and back.args.true_vocab_size == TRUE_V
    # Unknown size but the padding is already right for the target (24 rows = multiple of 4 * 2 for any 21..24).
    ckpt1 = _global(tied=True, tp=1)
    del ckpt1.args.true_vocab_size
    repad_global(ckpt1, 2)
    assert ckpt1.args.padded_vocab_size == 24 == vocab_size_with_padding(TRUE_V, DIV, 2)
    # A missing checkpoint directory is one line too, not a traceback.
    assert main(["--load", str(tmp_path / "nope"), "--save", str(tmp_path / "y"),
                 "--target-tensor-parallel-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "Traceback" not in err

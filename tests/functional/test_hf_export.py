"""Hugging Face export/import of real TP=2 checkpoints (one 2-rank spawn) and an HF -> ours -> HF round trip.

References are independent: Hugging Face's own GPT2LMHeadModel forward, and the original HF tensors.
"""

import argparse
import json
import os

import numpy as np
import pytest
import torch

from tests.multiprocess import run_distributed

V, H, HEADS, LAYERS, MAXPOS, S, B = 259, 32, 4, 2, 16, 12, 2
DIV = 8


def _write_bpe(folder):
    """A tiny byte-level GPT-2 vocabulary: 256 bytes, two merges, <|endoftext|> last (V = 259)."""
    from megatron.training.tokenizer.gpt2_tokenization import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["he"] = 256
    vocab["ll"] = 257
    vocab["<|endoftext|>"] = 258
    vf, mf = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vf, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(mf, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\nh e\nl l\n")
    return vf, mf


def _args(tp, **kw):
    from megatron.training.checkpoint_conversion import padded_vocab_size

    base = dict(num_layers=LAYERS, hidden_size=H, ffn_hidden_size=4 * H, num_attention_heads=HEADS,
                kv_channels=H // HEADS, max_position_embeddings=MAXPOS, seq_length=MAXPOS, true_vocab_size=V,
                make_vocab_size_divisible_by=DIV,
                padded_vocab_size=padded_vocab_size(V, DIV, tp), tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=1, tokenizer_type="GPT2BPETokenizer", bias_gelu_fusion=True,
                openai_gelu=False, params_dtype=torch.float32, untie_embeddings_and_output_weights=False,
                save=None, load=None, no_save_rng=False, no_save_optim=True, ckpt_step=None,
                exit_on_missing_checkpoint=True, finetune=False, no_load_optim=True, no_load_rng=True)
    base.update(kw)
    return argparse.Namespace(**base)


def _model(args, seed):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, hidden_dropout=0.0,
                            attention_dropout=0.0, max_position_embeddings=MAXPOS, bias_gelu_fusion=True,
                            tensor_model_parallel_size=args.tensor_model_parallel_size)
    return GPTModel(cfg, vocab_size=args.padded_vocab_size, max_sequence_length=MAXPOS, parallel_output=False).eval()


def _tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, S), generator=g), torch.arange(S).unsqueeze(0).expand(B, S)


def _body(rank, world, tmp):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron.core import parallel_state
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint
    from tools.convert_checkpoint_to_hf import export
    from tools.convert_hf_to_checkpoint import convert

    parallel_state.initialize_model_parallel(2)
    out = {}
    ckpt, hf_dir = os.path.join(tmp, "ckpt"), os.path.join(tmp, "hf")
    if rank == 0:
        _write_bpe(tmp)
    vf, mf = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
    out["bpe_files"] = (vf, mf)
    dist.barrier()
    # 1) a real TP=2 model (LayerNorms perturbed so their mapping counts) -> save -> export -> HF logits.
    args = _args(2, save=ckpt)
    model = _model(args, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tokens, pos = _tokens()
    with torch.no_grad():
        ours = model(tokens, pos, None)[..., :V]  # [b, s, V] (padding columns dropped)
    save_checkpoint(7, [model], None, None, args=args)
    if rank == 0:
        export(ckpt, hf_dir, vocab_file=vf, merge_file=mf)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            out["export_diff"] = float((hf(input_ids=tokens).logits - ours).abs().max())
            gen = hf.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=V - 1)
        out["generated"] = gen.shape[1]
        tok = AutoTokenizer.from_pretrained(hf_dir)
        out["hf_ids"] = tok("hello hell, ok")["input_ids"]
        out["config"] = json.load(open(os.path.join(hf_dir, "config.json")))
        # 2) import: an independent random HF model -> our TP=2 checkpoint.
        torch.manual_seed(9)
        ref = AutoModelForCausalLM.from_config(hf.config).eval()
        ref.save_pretrained(os.path.join(tmp, "hf_ref"))
        convert(os.path.join(tmp, "hf_ref"), os.path.join(tmp, "imported"), tp=2, divisible_by=DIV)
        with torch.no_grad():
            out["ref_logits"] = ref(input_ids=tokens).logits.numpy()
    dist.barrier()
    args = _args(2, load=os.path.join(tmp, "imported"))
    fresh = _model(args, seed=99)
    out["iteration"] = load_checkpoint([fresh], None, None, args=args)
    with torch.no_grad():
        out["imported_logits"] = fresh(tokens, pos, None)[..., :V].numpy()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("hf"))
    return run_distributed(_body, 2, args=(tmp,), timeout=300)


def test_tp2_export_matches_hugging_face_logits(results):
    r = results[0]
    assert r["export_diff"] < 1e-4
    assert r["generated"] == 9
    assert r["config"]["activation_function"] == "gelu_new" and r["config"]["vocab_size"] == V


def test_exported_tokenizer_matches_ours(results):
    from megatron.training.tokenizer import build_tokenizer

    vf, mf = results[0]["bpe_files"]
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=vf, merge_file=mf)
    ids = results[0]["hf_ids"]
    assert ids[:2] == [256, 257]  # "he" + "ll" merges applied by the HF tokenizer
    assert ids == ours.tokenize("hello hell, ok")


def test_hf_import_at_tp2_matches_hugging_face(results):
    assert results[0]["iteration"] == 0  # a release checkpoint
    for r in results:
        np.testing.assert_allclose(r["imported_logits"], results[0]["ref_logits"], rtol=0, atol=1e-4)


def test_hf_ours_hf_round_trip_is_identical(tmp_path):
    """HF -> TP=2 x PP=2 checkpoint -> HF gives bit-identical tensors (tied and untied)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from tools.convert_checkpoint_to_hf import export
    from tools.convert_hf_to_checkpoint import convert

    for tied in (True, False):
        cfg = GPT2Config(vocab_size=V, n_positions=MAXPOS, n_embd=H, n_layer=4, n_head=HEADS,
                         activation_function="gelu", tie_word_embeddings=tied)
        torch.manual_seed(1)
        src = tmp_path / f"src{tied}"
        GPT2LMHeadModel(cfg).save_pretrained(src)
        convert(str(src), str(tmp_path / f"ck{tied}"), tp=2, pp=2, divisible_by=DIV)
        assert os.path.isfile(tmp_path / f"ck{tied}" / "release" / "mp_rank_01_001" / "model_optim_rng.pt")
        export(str(tmp_path / f"ck{tied}"), str(tmp_path / f"back{tied}"))
        a, b = load_file(src / "model.safetensors"), load_file(tmp_path / f"back{tied}" / "model.safetensors")
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        back_cfg = json.load(open(tmp_path / f"back{tied}" / "config.json"))
        assert back_cfg["activation_function"] == "gelu" and back_cfg["tie_word_embeddings"] == tied


def test_export_dtype_and_kv_channels_checks(tmp_path):
    """config.json's torch_dtype is the tensors' dtype (Transformers then loads bf16); a head dim that does not
    tile the hidden size is refused with the flag named instead of writing an unloadable model."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron.training.checkpoint_conversion import load_global_checkpoint
    from megatron.training.checkpoint_hf import megatron_to_hf
    from megatron.training.checkpoint_io import CheckpointError
    from tools.convert_hf_to_checkpoint import convert

    cfg = GPT2Config(vocab_size=V, n_positions=MAXPOS, n_embd=H, n_layer=1, n_head=HEADS)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), str(tmp_path / "ck"), divisible_by=DIV)
    ckpt = load_global_checkpoint(str(tmp_path / "ck"))
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        sd, config = megatron_to_hf({k: v.to(dtype) for k, v in ckpt.model.items()}, ckpt.args, V)
        assert config["torch_dtype"] == name and {v.dtype for v in sd.values()} == {dtype}
    out = tmp_path / "bf16"
    sd, config = megatron_to_hf({k: v.to(torch.bfloat16) for k, v in ckpt.model.items()}, ckpt.args, V)
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    assert GPT2LMHeadModel.from_pretrained(out, torch_dtype="auto").transformer.wte.weight.dtype == torch.bfloat16
    ckpt.args.kv_channels = 2 * H // HEADS  # heads * kv = 2 * hidden
    with pytest.raises(CheckpointError, match="--kv-channels 16 x --num-attention-heads 4 = 64 .*--hidden-size 32"):
        megatron_to_hf(ckpt.model, ckpt.args, V)


def test_converter_mistakes_are_one_line(tmp_path, capsys):
    """Missing folders/files and unwritable outputs end as one stderr line with status 2, not a traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tools.convert_checkpoint_to_hf import main as to_hf
    from tools.convert_hf_to_checkpoint import main as from_hf

    GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=MAXPOS, n_embd=H, n_layer=1, n_head=HEADS)).save_pretrained(
        tmp_path / "src")
    (tmp_path / "file").write_text("x")
    assert from_hf(["--hf", str(tmp_path / "src"), "--save", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    for main, argv, needle in (
            (from_hf, ["--hf", str(tmp_path / "missing"), "--save", str(tmp_path / "x")], "missing"),
            (from_hf, ["--hf", str(tmp_path / "src"), "--save", str(tmp_path / "file" / "ck")], "file"),  # OSError
            (to_hf, ["--load", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "missing"),
            (to_hf, ["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "o"), "--vocab-file",
                     str(tmp_path / "no_vocab.json"), "--merge-file", str(tmp_path / "no_merges.txt")], "no_vocab")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err

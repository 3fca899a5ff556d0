"""GPTModel on one rank: equality with Hugging Face GPT-2, SDPA vs softmax attention, activation recomputation."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from tests.multiprocess import find_free_port

V, H, HEADS, LAYERS, MAXPOS, S, B = 96, 48, 4, 3, 24, 16, 2


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    """A one-process gloo group with TP=PP=1 (the TP layers need parallel_state)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _config(**kw):
    base = dict(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, hidden_dropout=0.0,
                attention_dropout=0.0, max_position_embeddings=MAXPOS)
    base.update(kw)
    return TransformerConfig(**base)


def _model(seed=1234, tied=True, **kw):
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return GPTModel(_config(**kw), vocab_size=V, max_sequence_length=MAXPOS, parallel_output=False,
                    share_embeddings_and_output_weights=tied)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _causal_mask():
    return torch.triu(torch.ones(S, S, dtype=torch.bool, device=_device()), diagonal=1).view(1, 1, S, S)


def _batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S + 1), generator=g).to(_device())
    position_ids = torch.arange(S, device=_device()).unsqueeze(0).expand(B, S)
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------- Hugging Face
def _to_hf_state_dict(sd):
    """Our (Megatron legacy) GPT-2 state dict -> transformers.GPT2LMHeadModel state dict."""
    hn = H // HEADS
    out = {"transformer.wte.weight": sd["language_model.embedding.word_embeddings.weight"],
           "transformer.wpe.weight": sd["language_model.embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": sd["language_model.encoder.final_layernorm.weight"],
           "transformer.ln_f.bias": sd["language_model.encoder.final_layernorm.bias"],
           "lm_head.weight": sd["language_model.embedding.word_embeddings.weight"]}
    for i in range(LAYERS):
        p, q = f"language_model.encoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = sd[p + "self_attention.query_key_value.weight"]  # [np*3*hn, h], rows (head, qkv, hn)
        qkv_b = sd[p + "self_attention.query_key_value.bias"]
        qkv_w = qkv_w.view(HEADS, 3, hn, H).permute(1, 0, 2, 3).reshape(3 * H, H)  # rows (qkv, head, hn)
        qkv_b = qkv_b.view(HEADS, 3, hn).permute(1, 0, 2).reshape(3 * H)
        out.update({
            q + "ln_1.weight": sd[p + "input_layernorm.weight"], q + "ln_1.bias": sd[p + "input_layernorm.bias"],
            q + "attn.c_attn.weight": qkv_w.t(), q + "attn.c_attn.bias": qkv_b,  # Conv1D: [in, out]
            q + "attn.c_proj.weight": sd[p + "self_attention.dense.weight"].t(),
            q + "attn.c_proj.bias": sd[p + "self_attention.dense.bias"],
            q + "ln_2.weight": sd[p + "post_attention_layernorm.weight"],
            q + "ln_2.bias": sd[p + "post_attention_layernorm.bias"],
            q + "mlp.c_fc.weight": sd[p + "mlp.dense_h_to_4h.weight"].t(),
            q + "mlp.c_fc.bias": sd[p + "mlp.dense_h_to_4h.bias"],
            q + "mlp.c_proj.weight": sd[p + "mlp.dense_4h_to_h.weight"].t(),
            q + "mlp.c_proj.bias": sd[p + "mlp.dense_4h_to_h.bias"],
        })
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _hf_model(activation):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=MAXPOS, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                  activation_function=activation, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg).to(_device()).eval()


@pytest.mark.parametrize("gelu", ["tanh-fused", "tanh", "erf"])
def test_matches_hugging_face_gpt2(gelu):
    kw = {"tanh-fused": dict(openai_gelu=True, bias_gelu_fusion=True), "tanh": dict(openai_gelu=True),
          "erf": {}}[gelu]
    ours = _model(**kw).eval()
    # perturb the LayerNorm params so that their mapping is checked too (they init to 1/0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = _hf_model("gelu_new" if gelu.startswith("tanh") else "gelu")
    missing, unexpected = hf.load_state_dict(_to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)

    tokens, position_ids, labels = _batch()
    with torch.no_grad():
        logits = ours(tokens, position_ids, None)  # [b, s, V]
        loss = ours(tokens, position_ids, None, labels=labels)  # [b, s]
        hf_out = hf(input_ids=tokens, labels=tokens)  # HF shifts the labels itself
    assert logits.shape == (B, S, V) and loss.shape == (B, S) and loss.dtype == torch.float32
    torch.testing.assert_close(logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    hf_token_loss = F.cross_entropy(hf_out.logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S)
    torch.testing.assert_close(loss, hf_token_loss, rtol=1e-5, atol=1e-5)
    # HF's own (shifted, mean) loss equals our per-token loss averaged over the positions it covers
    torch.testing.assert_close(loss[:, :-1].mean(), hf_out.loss, rtol=1e-5, atol=1e-6)
    # an explicit causal mask, and query-key layer scaling, change nothing mathematically
    mask = _causal_mask()
    scaled = _model(apply_query_key_layer_scaling=True, **kw).eval()
    scaled.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, position_ids, mask), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scaled(tokens, position_ids, mask), logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- attention paths
def _loss_and_grads(model, mask=None, seed=None):
    tokens, position_ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # same dropout masks for every run
    loss = model(tokens, position_ids, mask, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, tol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


def test_sdpa_attention_equals_softmax_path():
    ref = _model(apply_query_key_layer_scaling=True).train()
    sdpa = _model(use_flash_attn=True).train()
    sdpa.load_state_dict(ref.state_dict())
    _assert_same(_loss_and_grads(ref), _loss_and_grads(sdpa))
    # with a full mask: causal, plus key 3 hidden from every query after position 4
    mask = _causal_mask().clone()
    mask[..., 5:, 3] = True
    _assert_same(_loss_and_grads(ref, mask), _loss_and_grads(sdpa, mask))
    # and the mask really changes the result
    assert not torch.allclose(_loss_and_grads(ref)[0], _loss_and_grads(ref, mask)[0])


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="selective", use_flash_attn=True),
])
def test_recompute_gives_the_same_gradients(recompute):
    # dropout on, so recomputation must also replay the RNG streams exactly
    drop = dict(hidden_dropout=0.1, attention_dropout=0.1)
    ref = _model(use_flash_attn=recompute.get("use_flash_attn", False), **drop).train()
    rec = _model(**recompute, **drop).train()
    rec.load_state_dict(ref.state_dict())
    _assert_same(_loss_and_grads(ref, seed=99), _loss_and_grads(rec, seed=99))
    # sanity: dropout is active, so a different seed gives a different loss
    assert not torch.allclose(_loss_and_grads(ref, seed=99)[0], _loss_and_grads(ref, seed=100)[0])


def test_untied_output_layer_and_state_dict_keys():
    tied = _model()
    untied = _model(tied=False)
    keys = list(untied.state_dict())
    out_key = "language_model.output_layer.weight"
    assert out_key in keys and out_key not in tied.state_dict()
    assert keys.index("language_model.encoder.final_layernorm.weight") > max(
        i for i, k in enumerate(keys) if ".layers." in k)
    assert set(tied.state_dict()) | {"language_model.output_layer.weight"} == set(keys)
    # untied logits use output_layer, not the embedding
    tokens, position_ids, _ = _batch()
    untied.load_state_dict({**copy.deepcopy(tied.state_dict()),
                            "language_model.output_layer.weight": 2 * tied.state_dict()[
                                "language_model.embedding.word_embeddings.weight"]})
    with torch.no_grad():
        h = tied.language_model(tokens, position_ids, None).transpose(0, 1)  # [b, s, h]
        expected = h @ (2 * tied.language_model.embedding.word_embeddings.weight).t()
        torch.testing.assert_close(untied(tokens, position_ids, None), expected, rtol=1e-5, atol=1e-5)

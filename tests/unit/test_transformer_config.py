"""TransformerConfig: defaults and the one-line errors for mistaken flags."""

import math

import pytest
import torch

from megatron.core.transformer import TransformerConfig


def _cfg(**kw):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8)
    base.update(kw)
    return TransformerConfig(**base)


def test_defaults_derived_from_sizes():
    c = _cfg()
    assert c.ffn_hidden_size == 256 and c.kv_channels == 8
    # init methods: N(0, 0.02) and N(0, 0.02 / sqrt(2 L)), checked on a large sample
    torch.manual_seed(0)
    w = torch.empty(200_000)
    c.init_method(w)
    assert abs(w.std().item() - 0.02) < 5e-4 and abs(w.mean().item()) < 5e-4
    c.output_layer_init_method(w)
    assert abs(w.std().item() - 0.02 / math.sqrt(8)) < 2e-4
    assert _cfg(apply_query_key_layer_scaling=True, attention_softmax_in_fp32=False).attention_softmax_in_fp32


@pytest.mark.parametrize("kw, message", [
    (dict(num_attention_heads=12, tensor_model_parallel_size=5, hidden_size=60),
     r"--num-attention-heads \(12\) must be divisible by --tensor-model-parallel-size \(5\)"),
    (dict(ffn_hidden_size=100, tensor_model_parallel_size=8),
     r"--ffn-hidden-size \(100\) must be divisible by --tensor-model-parallel-size \(8\)"),
    (dict(hidden_size=60, num_attention_heads=8), r"--hidden-size \(60\) must be divisible by --num-attention-heads"),
    (dict(num_layers=3, pipeline_model_parallel_size=2),
     r"--num-layers \(3\) must be divisible by --pipeline-model-parallel-size \(2\)"),
    (dict(seq_length=2048, max_position_embeddings=1024),
     r"--seq-length \(2048\) must be <= --max-position-embeddings \(1024\)"),
    (dict(num_layers=0), r"--num-layers must be a positive integer"),
    (dict(recompute_granularity="partial"), r"--recompute-granularity must be 'full' or 'selective'"),
    (dict(recompute_granularity="full"), r"--recompute-granularity full needs --recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), r"--recompute-num-layers \(None\)"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
     r"--recompute-num-layers \(5\) must be between 1 and the layers per pipeline stage \(4\)"),
    (dict(recompute_granularity="selective", recompute_method="uniform"),
     r"--recompute-method \(uniform\) is only used with --recompute-granularity full"),
    (dict(recompute_method="block", recompute_num_layers=1), r"--recompute-method \(block\) is only used"),
    (dict(distribute_saved_activations=True), r"--distribute-saved-activations needs --recompute-granularity full"),
    (dict(hidden_dropout=1.0), r"--hidden-dropout \(1.0\) must be in \[0, 1\)"),
    (dict(bias_gelu_fusion=True, add_bias_linear=False), r"--bias-gelu-fusion needs biases"),
    (dict(sequence_parallel=True), r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
])
def test_mistakes_are_rejected_with_the_flag_name(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


def test_valid_recompute_settings_accepted():
    assert _cfg(recompute_granularity="selective").recompute_method is None
    c = _cfg(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2,
             distribute_saved_activations=True, tensor_model_parallel_size=2)
    assert c.recompute_num_layers == 2

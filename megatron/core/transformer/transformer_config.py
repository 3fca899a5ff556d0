"""TransformerConfig: the architecture of a GPT/BERT-style transformer, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.utils import init_method_normal, scaled_init_method_normal


@dataclass
class TransformerConfig(ModelParallelConfig):
    """Transformer architecture and kernel/recompute switches (Megatron-LM names).

    Every mistake a user can make with the flags is rejected in ``__post_init__`` with one
    ``ValueError`` that names the Megatron-LM flag.

    Attributes:
        num_layers: transformer layers in the whole model (all pipeline stages together).
        hidden_size: model width h.
        num_attention_heads: attention heads (split across tensor-parallel ranks).
        ffn_hidden_size: MLP width (default 4h).
        kv_channels: per-head size (default h / num_attention_heads).
        seq_length: training sequence length (optional; checked against max_position_embeddings).
        max_position_embeddings: rows of the learned position table (optional here; the GPT model
            takes it as ``max_sequence_length``).
        hidden_dropout: dropout after the attention and MLP output projections and on the embeddings.
        attention_dropout: dropout on the attention probabilities.
        init_method_std: std of the normal weight init.
        init_method: init for input-side weights (default N(0, init_method_std)).
        output_layer_init_method: init for output projections (default N(0, std / sqrt(2 L))).
        layernorm_epsilon: layer-norm epsilon.
        apply_query_key_layer_scaling: divide Q.K by the layer number and multiply it back inside the
            fp32 softmax (fp16 range safety; forces attention_softmax_in_fp32).
        attention_softmax_in_fp32: compute the unfused softmax in fp32.
        masked_softmax_fusion: use the CUDA scale-mask-softmax kernel when available.
        bias_gelu_fusion: fused bias + tanh-GeLU (Megatron's fused op is the tanh form).
        bias_dropout_fusion: fused bias + dropout + residual add.
        persist_layer_norm: accepted for Megatron compatibility.
        openai_gelu: tanh-approximation GeLU instead of the erf form.
        use_flash_attn: attention through torch.nn.functional.scaled_dot_product_attention.
        add_bias_linear: biases in the attention and MLP linear layers.
        fp32_residual_connection: keep the residual stream in fp32.
        apply_residual_connection_post_layernorm: residual taken after the layer norm (original BERT).
        recompute_granularity: None, 'full' (whole layers) or 'selective' (core attention only).
        recompute_method: 'uniform' (chunks of recompute_num_layers) or 'block' (the first
            recompute_num_layers layers of each stage); only with 'full'.
        recompute_num_layers: see recompute_method.
        distribute_saved_activations: store checkpointed layer inputs split across TP ranks.
        fp16_lm_cross_entropy: compute the LM loss on fp16 logits (default: in fp32).
    """

    num_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    ffn_hidden_size: Optional[int] = None
    kv_channels: Optional[int] = None
    seq_length: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    init_method: Optional[Callable] = None
    output_layer_init_method: Optional[Callable] = None
    layernorm_epsilon: float = 1e-5
    apply_query_key_layer_scaling: bool = False
    attention_softmax_in_fp32: bool = True
    masked_softmax_fusion: bool = False
    bias_gelu_fusion: bool = False
    bias_dropout_fusion: bool = False
    persist_layer_norm: bool = False
    openai_gelu: bool = False
    use_flash_attn: bool = False
    add_bias_linear: bool = True
    fp32_residual_connection: bool = False
    apply_residual_connection_post_layernorm: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    distribute_saved_activations: bool = False
    fp16_lm_cross_entropy: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_sizes()
        self._check_parallel_divisibility()
        self._check_recompute()
        for name, flag in (("hidden_dropout", "--hidden-dropout"), ("attention_dropout", "--attention-dropout")):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{flag} ({p}) must be in [0, 1)")
        if self.bias_gelu_fusion and not self.add_bias_linear:
            raise ValueError("--bias-gelu-fusion needs biases in the linear layers; "
                             "pass --no-bias-gelu-fusion together with --disable-bias-linear")
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = scaled_init_method_normal(self.init_method_std, self.num_layers)

    def _check_sizes(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer (got {getattr(self, name)})")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                                 f"({self.num_attention_heads}), or set --kv-channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size <= 0 or self.kv_channels <= 0:
            raise ValueError(f"--ffn-hidden-size ({self.ffn_hidden_size}) and --kv-channels ({self.kv_channels}) "
                             "must be positive")
        if (self.seq_length is not None and self.max_position_embeddings is not None
                and self.seq_length > self.max_position_embeddings):
            raise ValueError(f"--seq-length ({self.seq_length}) must be <= --max-position-embeddings "
                             f"({self.max_position_embeddings}); raise --max-position-embeddings or "
                             "shorten --seq-length")

    def _check_parallel_divisibility(self) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.num_attention_heads % tp != 0:
            raise ValueError(f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp})")
        if self.ffn_hidden_size % tp != 0:
            raise ValueError(f"--ffn-hidden-size ({self.ffn_hidden_size}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp})")
        if self.num_layers % pp != 0:
            raise ValueError(f"--num-layers ({self.num_layers}) must be divisible by "
                             f"--pipeline-model-parallel-size ({pp})")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (self.num_layers // pp) % vpp != 0:
            raise ValueError(f"layers per pipeline stage ({self.num_layers // pp}) must be divisible by the "
                             f"number of virtual stages ({vpp}); check --num-layers-per-virtual-pipeline-stage")

    def _check_recompute(self) -> None:
        granularity, method = self.recompute_granularity, self.recompute_method
        if granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be 'full' or 'selective' (got {granularity!r})")
        if method not in (None, "uniform", "block"):
            raise ValueError(f"--recompute-method must be 'uniform' or 'block' (got {method!r})")
        if granularity == "full":
            if method is None:
                raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
            layers_per_stage = self.num_layers // self.pipeline_model_parallel_size
            n = self.recompute_num_layers
            if n is None or n < 1 or n > layers_per_stage:
                raise ValueError(f"--recompute-num-layers ({n}) must be between 1 and the layers per pipeline "
                                 f"stage ({layers_per_stage}) with --recompute-granularity full")
        else:
            if method is not None:
                raise ValueError(f"--recompute-method ({method}) is only used with --recompute-granularity full")
            if self.recompute_num_layers is not None:
                raise ValueError("--recompute-num-layers is only used with --recompute-granularity full")
        if self.distribute_saved_activations:
            if granularity != "full":
                raise ValueError("--distribute-saved-activations needs --recompute-granularity full")
            if self.sequence_parallel:
                raise ValueError("--distribute-saved-activations cannot be used with --sequence-parallel")

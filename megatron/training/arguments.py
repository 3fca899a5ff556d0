"""Command-line flags (Megatron-LM names) and their validation.

``parse_args`` reads the flags; ``validate_args`` derives the dependent values (data-parallel size,
number of micro-batches, padded vocabulary, ...) and rejects mistakes with one clear message that
names the flag. Only megatron/training reads these; megatron/core gets config dataclasses built by
:func:`core_transformer_config_from_args` and friends.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional

import torch


class ArgumentError(ValueError):
    """A flag combination the user must fix; the message names the flag and the fix."""


def _add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP hidden size (default 4 * hidden size).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--kv-channels", type=int, default=None, help="Head dim (default hidden size / heads).")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Size of the learned position table (default --seq-length).")
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute"])
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this times the TP size.")
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="tanh approximation of GeLU.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate output layer instead of the tied word embeddings.")
    g.add_argument("--apply-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_true",
                   help="Scale Q*K^T by 1/layer_number (with the softmax in fp32); numerically safer in fp16.")
    g.add_argument("--no-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_false")
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    g.add_argument("--fp32-residual-connection", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--use-flash-attn", action="store_true",
                   help="Attention through torch.nn.functional.scaled_dot_product_attention.")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false")
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false")
    g.add_argument("--no-persist-layer-norm", dest="persist_layer_norm", action="store_false")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Activation recomputation: full layers or only core attention.")
    g.add_argument("--recompute-activations", action="store_true", help="Alias of --recompute-granularity selective.")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--distribute-saved-activations", action="store_true")


def _add_parallel_args(parser):
    g = parser.add_argument_group("parallelism and distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per model chunk for the interleaved pipeline schedule.")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--distributed-backend", choices=["gloo", "nccl"], default=None,
                   help="Default: nccl when CUDA is available, else gloo.")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help="Set by the launcher.")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap DP all-reduce with backward.")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="Elements per DP all-reduce bucket.")
    g.add_argument("--use-cpu-initialization", action="store_true")


def _add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Default: micro-batch-size * data-parallel size (no accumulation).")
    g.add_argument("--rampup-batch-size", nargs="*", default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="Exit after this iteration count.")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="Accepted for compatibility: SIGTERM/SIGUSR1 always stop at the next step boundary.")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--mock-data", action="store_true", help="Synthetic (learnable) tokens instead of --data-path.")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0, help="Global grad-norm clipping (0 disables).")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true")


def _add_precision_args(parser):
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="Static loss scale (default: dynamic).")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)


def _add_logging_args(parser):
    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--log-throughput", action="store_true", help="Accepted; throughput is always logged.")
    g.add_argument("--log-params-norm", action="store_true")
    g.add_argument("--log-num-zeros-in-grad", action="store_true")


def _add_data_args(parser):
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Dataset prefix(es), optionally weighted: --data-path 0.3 a 0.7 b.")
    g.add_argument("--split", default="969, 30, 1", help="Train/valid/test split of --data-path documents.")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--tokenizer-type", default=None,
                   choices=["GPT2BPETokenizer", "NullTokenizer"])
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size for NullTokenizer.")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--dataloader-type", choices=["single"], default="single")


def _add_checkpoint_args(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--load", default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="Load weights only and start at iteration 0.")
    g.add_argument("--ckpt-step", type=int, default=None, help="Load this iteration instead of the latest.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--use-checkpoint-args", action="store_true")


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Megatron-style GPT pretraining (tensor/pipeline/data parallel; CPU gloo or GPU NCCL).",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (_add_model_args, _add_parallel_args, _add_training_args, _add_precision_args,
                _add_logging_args, _add_data_args, _add_checkpoint_args):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def parse_args(extra_args_provider: Optional[Callable] = None, args_list: Optional[List[str]] = None,
               ignore_unknown_args: bool = False) -> argparse.Namespace:
    """Parse flags from ``args_list`` (default sys.argv[1:])."""
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(args_list)
    else:
        args = parser.parse_args(args_list)
    return args


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


def validate_args(args: argparse.Namespace, world_size: int, defaults: Optional[dict] = None) -> argparse.Namespace:
    """Fill derived values and reject bad combinations (one clear message naming the flag)."""
    for key, value in (defaults or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.world_size = world_size
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        _require(getattr(args, flag) is not None, f"--{flag.replace('_', '-')} is required")
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "global_batch_size", "vocab_size", "make_vocab_size_divisible_by", "ffn_hidden_size", "kv_channels",
                 "max_position_embeddings", "train_iters", "train_samples"):
        value = getattr(args, flag)
        _require(value is None or value > 0, f"--{flag.replace('_', '-')} must be > 0 (got {value})")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    _require(world_size % (tp * pp) == 0,
             f"world size ({world_size}) is not divisible by --tensor-model-parallel-size ({tp}) x "
             f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes")
    args.data_parallel_size = world_size // (tp * pp)
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
             f"--tensor-model-parallel-size ({tp})")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    _require(args.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size ({args.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})")
    if args.kv_channels is None:
        _require(args.hidden_size % args.num_attention_heads == 0,
                 f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
                 f"({args.num_attention_heads}) (or set --kv-channels)")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(args.seq_length <= args.max_position_embeddings,
             f"--seq-length ({args.seq_length}) must be <= --max-position-embeddings "
             f"({args.max_position_embeddings})")
    _require(args.num_layers % pp == 0,
             f"--num-layers ({args.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp})")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        per_stage = args.num_layers // pp
        _require(per_stage % args.num_layers_per_virtual_pipeline_stage == 0,
                 f"layers per pipeline stage ({per_stage}) must be divisible by "
                 f"--num-layers-per-virtual-pipeline-stage ({args.num_layers_per_virtual_pipeline_stage})")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # Megatron silently disables it at TP=1
    if args.sequence_parallel:
        _require(args.seq_length % tp == 0,
                 f"--seq-length ({args.seq_length}) must be divisible by --tensor-model-parallel-size ({tp}) "
                 "with --sequence-parallel")

    # Batch sizes and gradient accumulation.
    _require(args.rampup_batch_size is None, "--rampup-batch-size is not supported; use a fixed --global-batch-size")
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _require(args.global_batch_size % (args.micro_batch_size * dp) == 0,
             f"--global-batch-size ({args.global_batch_size}) must be divisible by --micro-batch-size "
             f"({args.micro_batch_size}) x data-parallel size ({dp})")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if pp > 1 and args.virtual_pipeline_model_parallel_size is not None:
        _require(args.num_microbatches % pp == 0,
                 f"the interleaved schedule needs the number of micro-batches ({args.num_microbatches}) to be "
                 f"divisible by --pipeline-model-parallel-size ({pp})")

    # Iterations and schedule.
    if args.train_iters is None and args.train_samples is not None:
        _require(args.train_samples % args.global_batch_size == 0,
                 "--train-samples must be a multiple of --global-batch-size")
        args.train_iters = args.train_samples // args.global_batch_size
    _require(args.train_iters is not None and args.train_iters > 0, "--train-iters is required (> 0)")
    _require(args.lr is not None, "--lr is required")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        _require(args.lr_warmup_iters == 0, "use only one of --lr-warmup-fraction and --lr-warmup-iters")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    _require(args.lr_warmup_iters < args.lr_decay_iters,
             f"--lr-warmup-iters ({args.lr_warmup_iters}) must be < --lr-decay-iters ({args.lr_decay_iters})")
    _require(args.min_lr <= args.lr, f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr})")
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay

    # Precision.
    _require(not (args.fp16 and args.bf16), "--fp16 and --bf16 are mutually exclusive")
    args.params_dtype = torch.half if args.fp16 else (torch.bfloat16 if args.bf16 else torch.float32)
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True  # as Megatron: fp32 main grads for bf16
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full":
        _require(args.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform|block")
        if args.recompute_num_layers is None:
            args.recompute_num_layers = 1
    elif args.recompute_method is not None:
        _require(False, "--recompute-method needs --recompute-granularity full")

    # Backend and device.
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"
    _require(args.distributed_backend != "nccl" or torch.cuda.is_available(),
             "--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")

    # Data and tokenizer.
    per_split = [f for f in ("train_data_path", "valid_data_path", "test_data_path") if getattr(args, f)]
    _require(not (args.data_path and per_split),
             f"give either --data-path (split by --split) or --{per_split[0].replace('_', '-') if per_split else ''} "
             "and the other per-split paths, not both")
    _require(not (per_split and not args.train_data_path and not args.mock_data),
             "--valid-data-path/--test-data-path need --train-data-path too (or use --data-path with --split)")
    has_paths = bool(args.data_path) or bool(args.train_data_path)
    _require(args.mock_data or has_paths,
             "no training data: give --data-path PREFIX (or --train-data-path ...), or --mock-data")
    if args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer" if args.mock_data else "GPT2BPETokenizer"
    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size N")
    else:
        for flag in ("vocab_file", "merge_file"):
            path = getattr(args, flag)
            _require(path is not None, f"--tokenizer-type GPT2BPETokenizer needs --{flag.replace('_', '-')}")
            _require(os.path.isfile(path), f"--{flag.replace('_', '-')} {path}: no such file")
    for flag in ("log_interval", "eval_interval"):
        _require(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be > 0")
    if args.save_interval is not None:
        _require(args.save_interval > 0, "--save-interval must be > 0")
    try:  # the model config's own checks (recompute layers, dropout ranges, ...) as one clear line too
        core_transformer_config_from_args(args)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    return args


def core_transformer_config_from_args(args: argparse.Namespace):
    """Build the TransformerConfig dataclass megatron.core expects from parsed flags."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels, seq_length=args.seq_length,
        max_position_embeddings=args.max_position_embeddings,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, layernorm_epsilon=args.layernorm_epsilon,
        apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32 or args.apply_query_key_layer_scaling,
        masked_softmax_fusion=args.masked_softmax_fusion, bias_gelu_fusion=args.bias_gelu_fusion,
        bias_dropout_fusion=args.bias_dropout_fusion, persist_layer_norm=args.persist_layer_norm,
        openai_gelu=args.openai_gelu, use_flash_attn=args.use_flash_attn,
        fp32_residual_connection=args.fp32_residual_connection,
        apply_residual_connection_post_layernorm=args.apply_residual_connection_post_layernorm,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distribute_saved_activations=args.distribute_saved_activations,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, use_cpu_initialization=args.use_cpu_initialization,
        params_dtype=args.params_dtype, fp16=args.fp16, bf16=args.bf16,
        # The residual stream crosses pipeline stages; keep it fp32 when it is fp32.
        pipeline_dtype=torch.float32 if args.fp32_residual_connection else args.params_dtype,
    )

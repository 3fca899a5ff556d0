"""The pretraining loop: ``pretrain(dataset_provider, model_provider, model_type, forward_step_func)``.

As in Megatron-LM: initialise, build the model (DDP-wrapped) and optimizer, build data iterators,
train with periodic logging / validation / checkpointing, and stop cleanly on --exit-interval,
--exit-duration-in-mins or SIGTERM/SIGUSR1 (finishing the step, saving when --save is set).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.fusions import log_fusion_status
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import ModelType
from megatron.training import global_vars
from megatron.training.arguments import ArgumentError
from megatron.training.checkpoint_io import CheckpointError
from megatron.training.data_samplers import build_pretraining_data_loader
from megatron.training.initialize import initialize_megatron
from megatron.training.training_log import TrainingLogger, evaluation_line
from megatron.training.utils import collective_device, print_datetime, print_rank_0, print_rank_last


def get_model(model_provider_func: Callable, model_type=ModelType.encoder_or_decoder,
              wrap_with_ddp: bool = True) -> List[torch.nn.Module]:
    """Build this rank's model chunk(s), move them to the device and precision, wrap them for DP."""
    args = global_vars.get_args()
    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    # Every rank builds from the same generator state (--seed, without the per-stage offset of
    # set_random_seed), so initial weights do not depend on the pipeline layout; the dropout
    # streams are left as they were.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(args.seed)
        for i in range(vp or 1):
            if vp is not None:
                parallel_state.set_virtual_pipeline_model_parallel_rank(i)
            chunks.append(model_provider_func(pre_process=parallel_state.is_pipeline_first_stage(),
                                              post_process=parallel_state.is_pipeline_last_stage()))
    if vp is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    for chunk in chunks:
        chunk.model_type = model_type
        for param in chunk.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunk.to(device=args.device)
        if args.fp16 or args.bf16:
            chunk.to(dtype=args.params_dtype)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if parallel_state.get_data_parallel_rank() == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({parallel_state.get_tensor_model_parallel_rank()}, "
              f"{parallel_state.get_pipeline_model_parallel_rank()}): {n_params}", flush=True)
    if not wrap_with_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
                                               overlap_grad_reduce=args.overlap_grad_reduce,
                                               bucket_size=args.ddp_bucket_size)
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    for w in wrapped:
        w.broadcast_params()  # identical starting weights on every DP replica
    return wrapped


def get_optimizer_param_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron counts scheduler steps in samples: iterations x global batch size."""
    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay, end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


def setup_model_and_optimizer(model_provider_func: Callable, model_type=ModelType.encoder_or_decoder):
    args = global_vars.get_args()
    model = get_model(model_provider_func, model_type)
    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, fp16=args.fp16, bf16=args.bf16, params_dtype=args.params_dtype,
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis, clip_grad=args.clip_grad, log_num_zeros_in_grad=args.log_num_zeros_in_grad)
    optimizer = get_megatron_optimizer(opt_config, model)
    opt_param_scheduler = get_optimizer_param_scheduler(optimizer, args)
    args.iteration, args.consumed_train_samples, args.consumed_valid_samples = 0, 0, 0
    if args.load is not None:
        from megatron.training.checkpointing import load_checkpoint

        args.iteration = load_checkpoint(model, optimizer, opt_param_scheduler)
    return model, optimizer, opt_param_scheduler


def _cyclic(loader):
    while True:
        yield from loader


def build_train_valid_test_data_iterators(dataset_provider: Callable):
    """Ask the provider for datasets sized for the whole run, wrap them in resumable loaders."""
    args = global_vars.get_args()
    gbs = args.global_batch_size
    eval_iters = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    num_samples = [args.train_iters * gbs, eval_iters * gbs, args.eval_iters * gbs]
    train_ds, valid_ds, test_ds = dataset_provider(num_samples)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def loader(ds, consumed):
        if ds is None:
            return None
        return build_pretraining_data_loader(ds, consumed, args.micro_batch_size, dp_rank, dp_size,
                                             num_workers=args.num_workers)

    # A resumed run that already reached --train-iters reads no training data (its samples are used up).
    train = loader(train_ds, args.consumed_train_samples) if args.iteration < args.train_iters else None
    # Validation continues where the interrupted run stopped (as Megatron), wrapping around the dataset.
    valid = loader(valid_ds, args.consumed_valid_samples % len(valid_ds)) if valid_ds is not None and len(valid_ds) \
        else None
    test = loader(test_ds, 0)
    its = (iter(train) if train is not None else None, _cyclic(valid) if valid is not None else None,
           _cyclic(test) if test is not None else None)
    vp = args.virtual_pipeline_model_parallel_size
    if vp is None:
        return its
    # Interleaved schedule: each model chunk reads the same micro-batches through its own iterator.
    return (None if train is None else [iter(train) for _ in range(vp)],
            None if valid is None else [_cyclic(valid) for _ in range(vp)],
            None if test is None else [_cyclic(test) for _ in range(vp)])


def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config):
    """One global batch: forward/backward over the micro-batches, grad sync, optimizer step."""
    args = global_vars.get_args()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward_func = get_forward_backward_func()
    losses_reduced = forward_backward_func(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False)
    update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
    if update_successful:
        opt_param_scheduler.step(increment=args.global_batch_size)
    skipped_iter = 0 if update_successful else 1
    loss_dict: Dict[str, torch.Tensor] = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for key in losses_reduced[0]:
            values = [x[key] for x in losses_reduced]
            loss_dict[key] = sum(values) / len(values)
    return loss_dict, skipped_iter, grad_norm, num_zeros_in_grad


def evaluate(forward_step_func, data_iterator, model, eval_iters: int) -> Dict[str, torch.Tensor]:
    """Average loss dict over ``eval_iters`` global batches, without gradients."""
    args = global_vars.get_args()
    for chunk in model:
        chunk.eval()
    totals: Dict[str, torch.Tensor] = {}
    forward_backward_func = get_forward_backward_func()
    with torch.no_grad():
        for _ in range(eval_iters):
            losses = forward_backward_func(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                for loss_dict in losses:
                    for key, value in loss_dict.items():
                        totals[key] = totals.get(key, 0.0) + value.float()
            args.consumed_valid_samples += args.global_batch_size
    for chunk in model:
        chunk.train()
    denom = eval_iters * args.num_microbatches
    return {k: v / denom for k, v in totals.items()}


def evaluate_and_print_results(prefix: str, forward_step_func, data_iterator, model, iteration: int,
                               eval_iters: int) -> Dict[str, float]:
    results = evaluate(forward_step_func, data_iterator, model, eval_iters)
    values = {k: float(v) for k, v in results.items()}
    line = evaluation_line(prefix, values)
    print_rank_last("-" * (len(line) + 1))
    print_rank_last(line)
    print_rank_last("-" * (len(line) + 1))
    writer = global_vars.get_tensorboard_writer()
    if writer is not None:
        for key, value in values.items():
            writer.add_scalar(f"{key} validation", value, iteration)
            writer.add_scalar(f"{key} validation ppl", math.exp(min(20.0, value)), iteration)
    return values


def _save(iteration, model, optimizer, opt_param_scheduler) -> None:
    args = global_vars.get_args()
    if args.save is None:
        return
    from megatron.training.checkpointing import save_checkpoint

    save_checkpoint(iteration, model, optimizer, opt_param_scheduler)


def _should_exit(args, iteration: int, start_time: float) -> Optional[str]:
    handler = global_vars.get_signal_handler()
    if handler is not None and any(handler.signals_received()):
        return "received a termination signal (SIGTERM/SIGUSR1)"
    if args.exit_duration_in_mins is not None:
        elapsed = torch.tensor([(time.time() - start_time) / 60.0], device=collective_device())
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if elapsed.item() > args.exit_duration_in_mins:
            return f"exceeded --exit-duration-in-mins {args.exit_duration_in_mins}"
    if args.exit_interval and iteration % args.exit_interval == 0:
        return f"reached --exit-interval {args.exit_interval}"
    return None


def train(forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator,
          valid_data_iterator, start_time: float) -> Dict[str, list]:
    """The loop; returns the per-iteration history (lm loss etc. on the last stage) for callers and tests."""
    args = global_vars.get_args()
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = lambda chunks: finalize_model_grads(chunks, config)
    config.no_sync_func = model[0].no_sync if len(model) == 1 else [chunk.no_sync for chunk in model]
    logger = TrainingLogger(args)
    history: Dict[str, list] = {"iteration": [], "lm loss": [], "grad norm": [], "loss scale": [], "skipped": []}
    for chunk in model:
        chunk.train()
    iteration = args.iteration
    exit_reason = None
    while iteration < args.train_iters:
        loss_dict, skipped, grad_norm, num_zeros = train_step(
            forward_step_func, train_data_iterator, model, optimizer, opt_param_scheduler, config)
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += args.global_batch_size
        loss_scale = float(optimizer.get_loss_scale())
        learning_rate = optimizer.param_groups[0]["lr"]
        history["iteration"].append(iteration)
        history["lm loss"].append(float(loss_dict["lm loss"]) if "lm loss" in loss_dict else None)
        history["grad norm"].append(grad_norm)
        history["loss scale"].append(loss_scale)
        history["skipped"].append(skipped)
        logger.record(iteration, loss_dict, learning_rate, loss_scale, grad_norm, num_zeros, skipped, model)

        if args.eval_interval and iteration % args.eval_interval == 0 and valid_data_iterator is not None \
                and args.eval_iters > 0:
            values = evaluate_and_print_results(f"iteration {iteration}", forward_step_func, valid_data_iterator,
                                                model, iteration, args.eval_iters)
            history.setdefault("validation", []).append((iteration, values.get("lm loss")))
        saved = False
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            _save(iteration, model, optimizer, opt_param_scheduler)
            saved = True
        exit_reason = _should_exit(args, iteration, start_time)
        if exit_reason is not None:
            if not saved:
                _save(iteration, model, optimizer, opt_param_scheduler)
            print_datetime(f"exiting program at iteration {iteration}: {exit_reason}")
            break
    history["exit_reason"] = exit_reason
    return history


def pretrain(train_valid_test_dataset_provider: Callable, model_provider: Callable, model_type,
             forward_step_func: Callable, process_non_loss_data_func=None, extra_args_provider=None,
             args_defaults: Optional[dict] = None, args_list: Optional[List[str]] = None) -> Dict[str, list]:
    """Megatron-LM's entry point. Returns the training history (ignored by command-line callers)."""
    start_time = time.time()
    try:  # every user mistake surfaces here as one line, before any training work is done
        args = initialize_megatron(extra_args_provider, args_defaults, args_list)
        print_datetime("after megatron is initialized")
        print_rank_0("> " + log_fusion_status(
            logging.getLogger(__name__), masked_softmax_fusion=args.masked_softmax_fusion,
            bias_gelu_fusion=args.bias_gelu_fusion, bias_dropout_fusion=args.bias_dropout_fusion,
            persist_layer_norm=args.persist_layer_norm))
        model, optimizer, opt_param_scheduler = setup_model_and_optimizer(model_provider, model_type)
        print_datetime("after model, optimizer, and learning rate scheduler are built")
        train_it, valid_it, test_it = build_train_valid_test_data_iterators(train_valid_test_dataset_provider)
        print_datetime("after dataloaders are built")
    except (ArgumentError, CheckpointError, ValueError, OSError) as err:
        # Set-up failures come from flags, files and data; say it in one line (MEGATRON_TRACEBACK=1 for the trace).
        if os.environ.get("MEGATRON_TRACEBACK") == "1":
            raise
        print(f"{sys.argv[0]}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    history: Dict[str, list] = {"iteration": [], "lm loss": []}
    if args.iteration < args.train_iters:
        history = train(forward_step_func, model, optimizer, opt_param_scheduler, train_it, valid_it, start_time)
    finished = history.get("exit_reason") is None
    if finished:
        trained = bool(history["iteration"])  # a resume of a finished run has nothing new to save
        if args.save and trained and not (args.save_interval and args.iteration % args.save_interval == 0):
            _save(args.iteration, model, optimizer, opt_param_scheduler)
        if valid_it is not None and args.eval_iters > 0:
            history["valid"] = evaluate_and_print_results(f"iteration {args.iteration} on validation set",
                                                          forward_step_func, valid_it, model, args.iteration,
                                                          args.eval_iters)
        if test_it is not None and args.eval_iters > 0:
            history["test"] = evaluate_and_print_results(f"iteration {args.iteration} on test set",
                                                         forward_step_func, test_it, model, args.iteration,
                                                         args.eval_iters)
    print_datetime("training done")
    global_vars.destroy_global_vars()
    parallel_state.destroy_model_parallel()  # so pretrain() can run again in the same process
    return history

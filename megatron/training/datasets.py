"""Turn --data-path / --train-data-path ... flags into GPT datasets (megatron.core.datasets)."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from megatron.core.datasets.builder import get_blend_from_list
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatron.training.arguments import ArgumentError


def _check_prefixes(flag: str, values: Optional[Sequence[str]]) -> None:
    blend = get_blend_from_list(values)
    if blend is None:
        return
    for prefix in blend[0]:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ArgumentError(f"{flag} {prefix}: {prefix + ext} does not exist (give the prefix written by "
                                    "tools/preprocess_data.py, e.g. my-corpus_text_document)")


def build_gpt_datasets_from_args(args, tokenizer, train_valid_test_num_samples: List[int]):
    """Build (train, valid, test) GPT datasets; each may be None. Collective: call on every rank."""
    flags = {"--data-path": args.data_path, "--train-data-path": args.train_data_path,
             "--valid-data-path": args.valid_data_path, "--test-data-path": args.test_data_path}
    for flag, values in flags.items():
        _check_prefixes(flag, values)
    per_split = [get_blend_from_list(p) for p in (args.train_data_path, args.valid_data_path, args.test_data_path)]
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=get_blend_from_list(args.data_path),
        blend_per_split=per_split if any(per_split) else None, split=args.split,
        train_valid_test_num_samples=list(train_valid_test_num_samples), path_to_cache=args.data_cache_path,
        eod_id=tokenizer.eod, eod_mask_loss=args.eod_mask_loss, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask)
    return build_gpt_datasets(config)

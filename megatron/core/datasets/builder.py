"""Build the train/valid/test GPT datasets from a :class:`GPTDatasetConfig` (blends, splits, sizes)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def get_blend_from_list(blend: Optional[Sequence[str]]) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """Parse ``--data-path`` values as Megatron-LM does.

    An odd-length list is all prefixes (weights None). An even-length list is read as ``weight prefix``
    pairs; if no weight parses as a float, every element is a prefix (weights None), so ``a b`` is two
    unweighted prefixes (blended in proportion to their sizes). Prefixes are stripped of whitespace.

    Examples: ``["a"]`` -> ``(["a"], None)``; ``["a", "b"]`` -> ``(["a", "b"], None)``;
    ``["0.3", "a", "0.7", "b"]`` -> ``(["a", "b"], [0.3, 0.7])``.

    Raises:
        ValueError: some but not all of the even positions are numbers.
    """
    if not blend:
        return None
    blend = list(blend)
    if len(blend) % 2 == 1:
        return [p.strip() for p in blend], None
    weights = []
    for raw in blend[0::2]:
        try:
            weights.append(float(raw))
        except ValueError:
            weights.append(None)
    if any(w is None for w in weights):
        if not all(w is None for w in weights):
            raise ValueError(f"--data-path: mixes 'weight prefix' pairs with bare prefixes in {blend}; give a "
                             "weight before every prefix or none at all")
        return [p.strip() for p in blend], None
    return [p.strip() for p in blend[1::2]], weights


def parse_split(split: str, size: int) -> List[int]:
    """Megatron's ``--split`` to 4 document boundaries ``[0, a, b, size]``."""
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        splits = [float(s) for s in (split.split(sep) if sep else [split])]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected numbers like 949,50,1") from None
    splits = (splits + [0.0, 0.0])[:3]
    if sum(splits) <= 0 or min(splits) < 0:
        raise ValueError(f"--split {split!r}: weights must be non-negative with a positive sum")
    splits = [s / sum(splits) for s in splits]
    index = [0]
    for s in splits:
        index.append(index[-1] + int(round(s * float(size))))
    diff = index[-1] - size
    index = [index[0]] + [i - diff for i in index[1:]]
    return index


def _gpt_dataset(prefix, documents, num_samples, split_name, config, cache):
    if prefix not in cache:
        cache[prefix] = IndexedDataset(prefix)
    return GPTDataset(cache[prefix], prefix, documents, num_samples, split_name, config)


def _build_split(blend, num_samples, split_name, config, split_bounds, cache):
    """One split's dataset from a blend; ``split_bounds(ds) -> (start, end)`` picks the documents."""
    prefixes, weights = blend
    parts, sizes = [], []
    for prefix in prefixes:
        if prefix not in cache:
            cache[prefix] = IndexedDataset(prefix)
        start, end = split_bounds(cache[prefix])
        parts.append((prefix, numpy.arange(start, end, dtype=numpy.int32)))
        sizes.append(int(cache[prefix].sequence_lengths[start:end].sum(dtype=numpy.int64)))
    if len(prefixes) == 1:
        prefix, docs = parts[0]
        return _gpt_dataset(prefix, docs, num_samples, split_name, config, cache) if len(docs) else None
    if weights is None:  # unweighted: blend in proportion to each dataset's tokens in this split
        weights = sizes
    if len(weights) != len(prefixes):
        raise ValueError(f"{len(prefixes)} data prefixes but {len(weights)} weights")
    keep = [i for i, (_, docs) in enumerate(parts) if len(docs) and weights[i] > 0]
    if not keep:
        return None
    w = numpy.asarray([weights[i] for i in keep], dtype=numpy.float64)
    w /= w.sum()
    datasets = []
    for i, wi in zip(keep, w):
        # 0.5% headroom (Megatron) so the greedy blend never runs past a component's length.
        n_i = None if num_samples is None else int(math.ceil(num_samples * wi * 1.005))
        datasets.append(_gpt_dataset(parts[i][0], parts[i][1], n_i, split_name, config, cache))
    size = num_samples if num_samples is not None else int(min(len(d) / wi for d, wi in zip(datasets, w)))
    return BlendedDataset(datasets, w, size)


def build_gpt_datasets(config: GPTDatasetConfig):
    """Build ``(train, valid, test)``; a split with no documents (or no blend) is None.

    With ``config.blend`` every prefix is divided by ``config.split``; with ``config.blend_per_split``
    each split uses all documents of its own prefixes. Multiple prefixes give a :class:`BlendedDataset`
    of exactly the requested number of samples; a single prefix gives a :class:`GPTDataset` (whose
    length is at least the requested number, whole epochs).
    """
    cache = {}
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        num_samples = config.train_valid_test_num_samples[i]
        if num_samples is not None and num_samples <= 0:
            out.append(None)
            continue
        if config.blend_per_split:
            blend = config.blend_per_split[i]
            if blend is None or not blend[0]:
                out.append(None)
                continue
            out.append(_build_split(blend, num_samples, name, config, lambda ds: (0, len(ds)), cache))
        else:
            if not config.split:
                raise ValueError("--split is required with --data-path")
            out.append(_build_split(config.blend, num_samples, name, config,
                                    lambda ds, i=i: tuple(parse_split(config.split, len(ds))[i:i + 2]), cache))
    return tuple(out)

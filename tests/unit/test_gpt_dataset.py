"""GPT dataset indices, items, masks, cache, blending and multi-rank build vs independent references."""

import os

import numpy
import pytest
import torch

from megatron.core.datasets import helpers_ref
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.builder import get_blend_from_list, parse_split
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.multiprocess import run_distributed

EOD = 1000


def make_corpus(prefix, n_docs, seed, lo=0, hi=EOD):
    """Random documents ending in EOD; returns the list of documents."""
    rng = numpy.random.default_rng(seed)
    docs = [numpy.append(rng.integers(lo, hi, size=int(rng.integers(1, 40))), EOD) for _ in range(n_docs)]
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for d in docs:
        b.add_document(d)
    b.finalize(prefix + ".idx")
    return docs


def reference_samples(docs, documents, num_samples, seq, seed):
    """Legacy Megatron algorithm written from the spec: token stream of shuffled documents, windows of seq+1."""
    tokens = sum(len(docs[d]) for d in documents)
    epochs = 1
    while (epochs * tokens - 1) // seq < num_samples:
        epochs += 1
    rng = numpy.random.RandomState(seed)
    separate = False
    if epochs > 1:
        before_last = ((epochs - 1) * tokens - 1) // seq
        separate = num_samples - before_last < int(0.8 * ((tokens - 1) // seq))
    if separate:
        first = numpy.array(list(documents) * (epochs - 1), dtype=numpy.int32)
        rng.shuffle(first)
        last = numpy.array(documents, dtype=numpy.int32)
        rng.shuffle(last)
        doc_order = numpy.concatenate([first, last])
    else:
        doc_order = numpy.array(list(documents) * epochs, dtype=numpy.int32)
        rng.shuffle(doc_order)
    stream = numpy.concatenate([docs[d] for d in doc_order])
    total = (epochs * tokens - 1) // seq
    n_first = before_last if separate else total
    order = numpy.arange(n_first, dtype=numpy.uint32)
    rng.shuffle(order)
    if separate:
        tail = numpy.arange(n_first, total, dtype=numpy.uint32)
        rng.shuffle(tail)
        order = numpy.concatenate([order, tail])
    return [stream[j * seq: j * seq + seq + 1] for j in order], separate


@pytest.mark.parametrize("epochs,expect_separate", [(None, False), (1.5, True), (2.9, False)])
def test_gpt_dataset_matches_reference(tmp_path, epochs, expect_separate):
    prefix = str(tmp_path / "corpus")
    docs = make_corpus(prefix, 40, seed=0)
    seq = 16
    per_epoch = (sum(len(d) for d in docs[:36]) - 1) // seq
    num_samples = None if epochs is None else int(per_epoch * epochs)
    cfg = GPTDatasetConfig(random_seed=5, sequence_length=seq, blend=([prefix], None), split="90,10,0",
                           train_valid_test_num_samples=[num_samples, None, None],
                           path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg)
    assert test is None
    bounds = parse_split("90,10,0", 40)
    assert bounds == [0, 36, 40, 40]
    train_docs = list(range(bounds[0], bounds[1]))
    n = num_samples if num_samples is not None else (sum(len(docs[d]) for d in train_docs) - 1) // seq
    want, separate = reference_samples(docs, train_docs, n, seq, seed=5)
    assert separate == expect_separate
    assert len(train) == len(want) >= n
    for i in range(len(train)):
        item = train[i]
        assert torch.equal(item["tokens"], torch.from_numpy(want[i][:-1].astype(numpy.int64)))
        assert torch.equal(item["labels"], torch.from_numpy(want[i][1:].astype(numpy.int64)))
        assert item["loss_mask"].dtype == torch.float32 and torch.all(item["loss_mask"] == 1)
        assert torch.equal(item["position_ids"], torch.arange(seq)) and "attention_mask" not in item
    v_want, _ = reference_samples(docs, list(range(36, 40)), len(valid), seq, seed=5)
    assert all(numpy.array_equal(valid.query_sample(i), v_want[i]) for i in range(len(valid)))
    with pytest.raises(IndexError):
        train[len(train)]


def dense_mask_reference(tokens, eod):
    s = len(tokens)
    segment = numpy.zeros(s, dtype=numpy.int64)
    pos = numpy.zeros(s, dtype=numpy.int64)
    seg, start = 0, 0
    for i in range(s):
        segment[i], pos[i] = seg, i - start
        if tokens[i] == eod:
            seg, start = seg + 1, i + 1
    allowed = numpy.array([[j <= i and segment[j] == segment[i] for j in range(s)] for i in range(s)])
    return ~allowed, (tokens != eod).astype(numpy.float32), pos


def test_masks_and_position_ids(tmp_path):
    prefix = str(tmp_path / "c")
    make_corpus(prefix, 30, seed=1)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([prefix], None), split="1",
                           path_to_cache=str(tmp_path / "cache"), eod_id=EOD, eod_mask_loss=True,
                           reset_position_ids=True, reset_attention_mask=True)
    train, _, _ = build_gpt_datasets(cfg)
    seen_eod = 0
    for i in range(min(len(train), 20)):
        item = train[i]
        tokens = item["tokens"].numpy()
        mask, loss, pos = dense_mask_reference(tokens, EOD)
        seen_eod += int((tokens == EOD).sum())
        assert item["attention_mask"].dtype == torch.bool and item["attention_mask"].shape == (1, 32, 32)
        numpy.testing.assert_array_equal(item["attention_mask"][0].numpy(), mask)
        numpy.testing.assert_array_equal(item["loss_mask"].numpy(), loss)
        numpy.testing.assert_array_equal(item["position_ids"].numpy(), pos)
    assert seen_eod > 5


def test_cache_reused_and_keyed(tmp_path):
    prefix = str(tmp_path / "c")
    make_corpus(prefix, 20, seed=2)
    cache = str(tmp_path / "cache")

    def build(seed=3, seq=8, n=50):
        return build_gpt_datasets(GPTDatasetConfig(
            random_seed=seed, sequence_length=seq, blend=([prefix], None), split="1,0,0",
            train_valid_test_num_samples=[n, None, None], path_to_cache=cache))[0]

    a = build()
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.startswith(a.unique_description_hash) for f in files)
    mtimes = [os.path.getmtime(os.path.join(cache, f)) for f in files]
    b = build()
    assert sorted(os.listdir(cache)) == files and mtimes == [os.path.getmtime(os.path.join(cache, f)) for f in files]
    assert isinstance(b.shuffle_idx, numpy.memmap)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    hashes = {a.unique_description_hash}
    for kw in (dict(seed=4), dict(seq=9), dict(n=60)):
        hashes.add(build(**kw).unique_description_hash)
    assert len(hashes) == 4 and len(os.listdir(cache)) == 16


def test_default_cache_next_to_data(tmp_path):
    prefix = str(tmp_path / "data" / "c")
    os.makedirs(tmp_path / "data")
    make_corpus(prefix, 10, seed=3)
    build_gpt_datasets(GPTDatasetConfig(random_seed=1, sequence_length=8, blend=([prefix], None), split="1"))
    assert len(os.listdir(tmp_path / "data" / "index-cache")) == 4


def test_blending_and_per_split_paths(tmp_path):
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    make_corpus(pa, 30, seed=4, lo=0, hi=400)
    make_corpus(pb, 30, seed=5, lo=500, hi=900)
    blend = get_blend_from_list(["0.3", pa, "0.7", pb])
    assert blend == ([pa, pb], [0.3, 0.7])
    cfg = GPTDatasetConfig(random_seed=7, sequence_length=16, blend=blend, split="80,20,0",
                           train_valid_test_num_samples=[200, 30, None], path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg)
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 30 and test is None
    want_d, want_s = numpy.zeros(200, numpy.uint8), numpy.zeros(200, numpy.int64)
    helpers_ref.build_blending_indices(want_d, want_s, numpy.array([0.3, 0.7]), 2, 200)
    numpy.testing.assert_array_equal(train.dataset_index, want_d)
    for i in range(200):
        toks = train[i]["tokens"]
        non_eod = toks[toks != EOD]
        from_b = bool(non_eod.min() >= 500)
        assert from_b == bool(want_d[i]) and (from_b or bool(non_eod.max() < 400))
        assert torch.equal(toks, train.datasets[want_d[i]][int(want_s[i])]["tokens"])
    # Separate per-split paths: valid comes entirely from b, test is absent.
    cfg2 = GPTDatasetConfig(random_seed=7, sequence_length=16, blend_per_split=[([pa], None), ([pb], None), None],
                            train_valid_test_num_samples=[None, 10, None], path_to_cache=str(tmp_path / "cache"))
    t2, v2, s2 = build_gpt_datasets(cfg2)
    assert s2 is None and len(v2) >= 10
    assert all(int(v2[i]["tokens"][v2[i]["tokens"] != EOD].min()) >= 500 for i in range(10))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--data-path"):
        get_blend_from_list(["0.3", "a", "b", "c"])  # a weight for "a" but not for "c"
    with pytest.raises(ValueError, match="--split"):
        parse_split("a,b", 10)
    with pytest.raises(ValueError, match="no data"):
        GPTDatasetConfig(random_seed=1, sequence_length=8)
    with pytest.raises(ValueError, match="eod id"):
        GPTDatasetConfig(random_seed=1, sequence_length=8, blend=(["x"], None), eod_mask_loss=True)
    prefix = str(tmp_path / "tiny")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in ([5, 6, 7, EOD], [EOD]):
        b.add_document(doc)
    b.finalize(prefix + ".idx")
    # 2 documents, split 1,1: the test split is the single 1-token document -> nothing to train on.
    with pytest.raises(ValueError, match=r"^test split of .*tiny holds 1 token.*--split") as err:
        build_gpt_datasets(GPTDatasetConfig(random_seed=1, sequence_length=8, blend=([prefix], None), split="0,1,1",
                                            train_valid_test_num_samples=[None, 4, 4],
                                            path_to_cache=str(tmp_path / "cache")))
    assert "\n" not in str(err.value)


def test_get_blend_from_list_megatron_rules():
    assert get_blend_from_list(None) is None
    assert get_blend_from_list(["a"]) == (["a"], None)
    assert get_blend_from_list([" a ", "b"]) == (["a", "b"], None)  # two unweighted prefixes
    assert get_blend_from_list(["a", "0.5", "b"]) == (["a", "0.5", "b"], None)  # odd: all prefixes
    assert get_blend_from_list(["1", "a"]) == (["a"], [1.0])
    assert get_blend_from_list(["0.3", "a ", "0.7", " b"]) == (["a", "b"], [0.3, 0.7])
    assert get_blend_from_list(["a", "b", "c", "d"]) == (["a", "b", "c", "d"], None)


def test_unweighted_prefixes_blend_by_size(tmp_path):
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    docs_a = make_corpus(pa, 20, seed=8, lo=0, hi=400)
    docs_b = make_corpus(pb, 60, seed=9, lo=500, hi=900)
    blend = get_blend_from_list([pa, pb])
    assert blend == ([pa, pb], None)
    cfg = GPTDatasetConfig(random_seed=3, sequence_length=16, blend=blend, split="1,0,0",
                           train_valid_test_num_samples=[300, None, None], path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg)
    assert isinstance(train, BlendedDataset) and len(train) == 300 and valid is None and test is None
    sizes = numpy.array([sum(map(len, docs_a)), sum(map(len, docs_b))], dtype=numpy.float64)
    numpy.testing.assert_allclose(train.weights, sizes / sizes.sum(), rtol=1e-12)
    from_b = sum(int(train[i]["tokens"][train[i]["tokens"] != EOD].min() >= 500) for i in range(300))
    assert abs(from_b / 300 - sizes[1] / sizes.sum()) < 0.01


def _fixed_corpus(prefix, lengths, seed):
    rng = numpy.random.default_rng(seed)
    docs = [numpy.append(rng.integers(0, EOD, size=n - 1), EOD) if n else numpy.zeros(0, numpy.int64)
            for n in lengths]
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for d in docs:
        b.add_document(d)
    b.finalize(prefix + ".idx")
    return docs


def test_split_shorter_than_one_sample_tiles_epochs(tmp_path):
    # 1000 docs of ~33 tokens, --seq-length 128, --split 969,30,1: the test split is 1 document (< 1 sample).
    prefix = str(tmp_path / "c")
    rng = numpy.random.default_rng(0)
    docs = _fixed_corpus(prefix, rng.integers(30, 37, size=1000), seed=1)
    seq = 128
    cfg = GPTDatasetConfig(random_seed=2, sequence_length=seq, blend=([prefix], None), split="969,30,1",
                           train_valid_test_num_samples=[8, 6, 5], path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg)
    bounds = parse_split("969,30,1", 1000)
    assert bounds[3] - bounds[2] == 1 and len(docs[bounds[2]]) < seq + 1
    assert len(test) >= 5 and test.num_epochs > 1
    want, _ = reference_samples(docs, list(range(bounds[2], bounds[3])), 5, seq, seed=2)
    assert len(test) == len(want)
    for i in range(len(test)):
        numpy.testing.assert_array_equal(test.query_sample(i), want[i])
    assert len(train) >= 8 and len(valid) >= 6


def test_zero_length_documents(tmp_path):
    # Empty documents (an empty JSON field in preprocess_data) contribute nothing to the token stream.
    prefix = str(tmp_path / "z")
    lengths = [7, 0, 12, 0, 0, 5, 9, 0, 3, 11, 0, 6]
    docs = _fixed_corpus(prefix, lengths, seed=4)
    seq = 8
    cfg = GPTDatasetConfig(random_seed=6, sequence_length=seq, blend=([prefix], None), split="1",
                           train_valid_test_num_samples=[40, None, None], path_to_cache=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(cfg)
    want, _ = reference_samples(docs, list(range(len(lengths))), 40, seq, seed=6)
    assert len(train) == len(want) >= 40
    for i in range(len(train)):
        numpy.testing.assert_array_equal(train.query_sample(i), want[i])


def _two_rank_body(rank, world_size, prefix, cache):
    cfg = GPTDatasetConfig(random_seed=9, sequence_length=16, blend=([prefix], None), split="1",
                           train_valid_test_num_samples=[64, None, None], path_to_cache=cache)
    train, _, _ = build_gpt_datasets(cfg)
    return [train[i]["tokens"].tolist() for i in range(len(train))]


def test_two_ranks_build_once_and_agree(tmp_path):
    prefix = str(tmp_path / "c")
    docs = make_corpus(prefix, 25, seed=6)
    cache = str(tmp_path / "cache")
    r0, r1 = run_distributed(_two_rank_body, world_size=2, args=(prefix, cache))
    assert r0 == r1
    want, _ = reference_samples(docs, list(range(25)), 64, 16, seed=9)
    assert r0 == [w[:-1].tolist() for w in want]
    assert len(os.listdir(cache)) == 4

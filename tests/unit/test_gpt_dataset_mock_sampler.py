"""MockGPTDataset (deterministic, learnable) and MegatronPretrainingSampler / data loader semantics."""

import pytest
import torch

from megatron.core.datasets.mock_dataset import MockGPTDataset
from megatron.training.data_samplers import MegatronPretrainingSampler, build_pretraining_data_loader


def test_mock_items_shapes_and_shift():
    ds = MockGPTDataset(num_samples=50, seq_length=32, vocab_size=1000, seed=7)
    assert len(ds) == 50
    for i in (0, 1, 49):
        item = ds[i]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (32,)
        assert item["labels"].dtype == torch.int64 and item["labels"].shape == (32,)
        assert item["loss_mask"].dtype == torch.float32 and torch.all(item["loss_mask"] == 1)
        assert torch.equal(item["position_ids"], torch.arange(32))
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
        assert int(item["tokens"].max()) < 1000 and int(item["tokens"].min()) >= 0
    with pytest.raises(IndexError):
        ds[50]


def test_mock_deterministic_and_seeded():
    a, b = MockGPTDataset(10, 16, 500, seed=1), MockGPTDataset(10, 16, 500, seed=1)
    c = MockGPTDataset(10, 16, 500, seed=2)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(10))
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(10))
    # Different samples start at different offsets.
    assert len({tuple(a[i]["tokens"].tolist()) for i in range(10)}) > 1


def test_mock_is_learnable():
    """Next token is a function of the previous 8 tokens across the whole dataset, so the best achievable
    loss is ~0, far below ln(vocab) (the loss of a uniform guess)."""
    ds = MockGPTDataset(num_samples=200, seq_length=64, vocab_size=50000, seed=3)
    table = {}
    conflicts = 0
    for i in range(len(ds)):
        t, l = ds[i]["tokens"].tolist(), ds[i]["labels"].tolist()
        for p in range(8, 64):
            key = tuple(t[p - 7:p + 1])
            conflicts += table.setdefault(key, l[p]) != l[p]
    assert conflicts == 0
    assert len(table) <= 64  # the context set is the period, not the sample count


def _reference_order(total, consumed, mbs, dp, rank):
    chunk = mbs * dp
    out = []
    n_full = (total - consumed) // chunk
    for k in range(n_full):
        base = consumed + k * chunk + rank * mbs
        out.append(list(range(base, base + mbs)))
    return out


@pytest.mark.parametrize("total,consumed,mbs,dp",
                         [(100, 0, 4, 2), (103, 24, 3, 4), (50, 49, 1, 1), (64, 8, 8, 1)])
def test_sampler_matches_reference(total, consumed, mbs, dp):
    seen = []
    for rank in range(dp):
        got = list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp))
        assert got == _reference_order(total, consumed, mbs, dp, rank)
        seen.extend(i for b in got for i in b)
    # Together the ranks consume each index from `consumed` once, a drop_last tail excepted.
    n = (total - consumed) // (mbs * dp) * mbs * dp
    assert sorted(seen) == list(range(consumed, consumed + n))


def test_sampler_resume_continues_order():
    full = list(MegatronPretrainingSampler(96, 0, 2, 1, 3))
    resumed = list(MegatronPretrainingSampler(96, 5 * 2 * 3, 2, 1, 3))
    assert resumed == full[5:]


def test_sampler_rejects_bad_args():
    with pytest.raises(ValueError, match="consumed_samples"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)


def test_data_loader_batches_and_resume():
    ds = MockGPTDataset(num_samples=40, seq_length=8, vocab_size=100, seed=0)
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None
    loader = build_pretraining_data_loader(ds, consumed_samples=0, micro_batch_size=2,
                                           data_parallel_rank=1, data_parallel_size=2)
    batches = list(loader)
    assert len(batches) == 10
    assert batches[0]["tokens"].shape == (2, 8) and batches[0]["loss_mask"].dtype == torch.float32
    assert torch.equal(batches[0]["tokens"], torch.stack([ds[2]["tokens"], ds[3]["tokens"]]))
    resumed = list(build_pretraining_data_loader(ds, 12, 2, 1, 2))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, batches[3:]))
    assert len(resumed) == 7

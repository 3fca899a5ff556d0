"""tools/preprocess_data.py end to end: JSONL -> 2 workers -> .bin/.idx read back == direct tokenization."""

import importlib.util
import json
import os
import sys

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.tokenizer import GPT2BPETokenizer
from tests.unit.test_gpt_dataset import reference_samples
from tests.unit.test_tokenizer import ROOT, load_train_tokenizer_tool, write_corpus_jsonl

pytest.importorskip("tokenizers")


def load_preprocess_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = mod  # worker tasks pickle its functions by module name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp_tok")
    write_corpus_jsonl(d / "train.jsonl", n_docs=30)
    load_train_tokenizer_tool().main(["--input", str(d / "train.jsonl"), "--vocab-size", "800",
                                      "--output-dir", str(d)])
    return str(d / "vocab.json"), str(d / "merges.txt")


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_preprocess_two_workers_end_to_end(tmp_path, tok_files):
    vocab, merges = tok_files
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:40]
    records = [{"text": t, "title": t[:30]} for t in texts]
    records.insert(5, {"text": "", "title": "empty text"})  # zero-length "text" document keeps keys aligned
    records.insert(9, {"text": "émoji 🎉 and 中文", "title": "x"})
    inp = _jsonl(tmp_path / "in.jsonl", records * 3)  # > several chunks, so ordering across workers matters
    tool = load_preprocess_tool()
    summary = tool.main(["--input", inp, "--output-prefix", str(tmp_path / "out" / "corpus"),
                         "--json-keys", "text", "title", "--tokenizer-type", "GPT2BPETokenizer",
                         "--vocab-file", vocab, "--merge-file", merges, "--append-eod", "--workers", "2",
                         "--log-interval", "50"])
    assert summary["documents"] == len(records) * 3 and summary["empty_documents"] == 3
    tok = GPT2BPETokenizer(vocab, merges, engine="reference")
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / "out" / f"corpus_{key}_document"))
        expected = [tok.reference.encode(r[key]) + [tok.eod] if r[key] else [] for r in records * 3]
        assert ds.dtype == numpy.uint16
        assert len(ds) == len(expected) and list(ds.document_indices) == list(range(len(expected) + 1))
        for i, ids in enumerate(expected):
            assert ds[i].tolist() == ids
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"corpus_{k}_document.{e}" for k in ("text", "title") for e in ("bin", "idx"))


def test_preprocess_invalid_lines(tmp_path, capsys):
    tool = load_preprocess_tool()
    lines = [{"text": "1 2 3"}, "{not json", {"text": "4 5"}, {"other": "x"}, "", {"text": "6"}]
    inp = _jsonl(tmp_path / "in.jsonl", lines)
    common = ["--input", inp, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--workers", "2"]
    with pytest.raises(SystemExit, match=r"^preprocess_data.py: error: .*in.jsonl line 2: invalid JSON.*--skip-inv"):
        tool.main(common + ["--output-prefix", str(tmp_path / "bad")])
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing half-written, no temp files left
    summary = tool.main(common + ["--output-prefix", str(tmp_path / "ok"), "--skip-invalid-lines"])
    assert summary["skipped_invalid_lines"] == 2
    assert "skipped 2 invalid lines" in capsys.readouterr().err
    ds = IndexedDataset(str(tmp_path / "ok_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4, 5], [6]]


def test_preprocess_bad_tokenizer_files(tmp_path):
    tool = load_preprocess_tool()
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    with pytest.raises(SystemExit, match=r"^preprocess_data.py: error: --vocab-file .*none.json: no such file$"):
        tool.main(["--input", inp, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "GPT2BPETokenizer",
                   "--vocab-file", str(tmp_path / "none.json"), "--merge-file", str(tmp_path / "none.txt")])


def test_preprocess_missing_merge_file_is_one_line(tmp_path, tok_files):
    import subprocess

    vocab, _ = tok_files
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    missing = str(tmp_path / "no-merges.txt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", inp,
                           "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "GPT2BPETokenizer",
                           "--vocab-file", vocab, "--merge-file", missing], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"preprocess_data.py: error: --merge-file {missing}: no such file"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_tokenizer_error_is_a_line_error(tmp_path, capsys, workers):
    # NullTokenizer raises ValueError on "4 x 5": reported like malformed JSON (file and line), or skipped.
    tool = load_preprocess_tool()
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}, {"text": "3"}, {"text": "4 x 5"}, {"text": "6 7"}])
    common = ["--input", inp, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--workers", workers]
    with pytest.raises(SystemExit) as err:
        tool.main(common + ["--output-prefix", str(tmp_path / "bad")])
    msg = str(err.value.code)
    assert msg.startswith("preprocess_data.py: error: --input ") and "\n" not in msg
    assert "in.jsonl line 3: key 'text' could not be tokenized (ValueError: NullTokenizer" in msg
    assert "--skip-invalid-lines" in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]
    summary = tool.main(common + ["--output-prefix", str(tmp_path / "ok"), "--skip-invalid-lines"])
    assert summary["skipped_invalid_lines"] == 1 and summary["documents"] == 3
    ds = IndexedDataset(str(tmp_path / "ok_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [6, 7]]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_empty_field_keeps_keys_aligned(tmp_path, workers):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets

    tool = load_preprocess_tool()
    records = [{"a": "1 2", "b": "3"}, {"a": "", "b": "4 5"}, {"a": "6", "b": ""}, {"a": "7 8 9", "b": "10"},
               {"a": "", "b": ""}, {"a": "11", "b": "12 13"}] * 15  # several chunks
    inp = _jsonl(tmp_path / "in.jsonl", records)
    summary = tool.main(["--input", inp, "--output-prefix", str(tmp_path / "o"), "--json-keys", "a", "b",
                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--append-eod",
                         "--workers", workers])
    assert summary["documents"] == len(records) and summary["empty_documents"] == 4 * 15
    for key in ("a", "b"):
        ds = IndexedDataset(str(tmp_path / f"o_{key}_document"))
        want = [[int(x) for x in r[key].split()] + ([100] if r[key] else []) for r in records]
        assert len(ds) == len(records) and list(ds.document_indices) == list(range(len(records) + 1))
        assert [ds[i].tolist() for i in range(len(ds))] == want
    # The GPT dataset reads the zero-length documents as contributing no tokens.
    prefix = str(tmp_path / "o_a_document")
    train, _, _ = build_gpt_datasets(GPTDatasetConfig(random_seed=1, sequence_length=4, blend=([prefix], None),
                                                      split="1", path_to_cache=str(tmp_path / "cache")))
    docs = [numpy.array([int(x) for x in r["a"].split()] + ([100] if r["a"] else []), dtype=numpy.int64)
            for r in records]
    want, _ = reference_samples(docs, list(range(len(docs))), (sum(map(len, docs)) - 1) // 4, 4, seed=1)
    assert len(train) == len(want)
    for i in range(len(train)):
        numpy.testing.assert_array_equal(train.query_sample(i), want[i])

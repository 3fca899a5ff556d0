"""GPT-2 BPE tokenizer vs Hugging Face `tokenizers` from the same files; NullTokenizer; padding; file errors."""

import importlib.util
import json
import os
import pydoc_data.topics
import random
import re

import pytest

from megatron.training.tokenizer import (
    GPT2BPETokenizer,
    NullTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)

tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_train_tokenizer_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(ROOT, "tools", "train_tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_corpus_jsonl(path, n_docs=60):
    texts = list(pydoc_data.topics.topics.values())[:n_docs]
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_corpus_jsonl(d / "corpus.jsonl")
    load_train_tokenizer_tool().main(["--input", str(d / "corpus.jsonl"), "--vocab-size", "1500",
                                      "--output-dir", str(d)])
    return str(d / "vocab.json"), str(d / "merges.txt")


def hf_reference(vocab_file, merge_file):
    """Independent reference: HF's ByteLevelBPETokenizer (GPT-2 pre-tokenizer, no prefix space)."""
    from tokenizers import ByteLevelBPETokenizer

    return ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)


def varied_texts():
    rng = random.Random(0)
    texts = [
        "", " ", "Hello, world!", "Hello world\n\nHello   world  \t\tend   ",
        "I'm sure you're right; they've said we'll go, she'd know, it's John's. DON'T SHOUT'S",
        "can't won't shouldn't y'all 'tis rock'n'roll ''quoted'' '",
        "Emoji: 🎉🎉 👩‍👩‍👧‍👦 🇫🇷🇩🇪 ❤️ 👍🏽 and text",
        "Unicode: naïve café résumé Ærøskøbing Straße İstanbul ǅ ﬁ ＡＢＣ",
        "中文字符测试，日本語のテキスト、한국어 텍스트。", "العربية שלום Ελληνικά Русский текст",
        "combining: e\u0301 a\u0308 \u0915\u094d\u0937 zero\u200bwidth", "nbsp\u00a0here\u3000ideo\u2028ls",
        "numbers 12345 3.14159 1,000,000 ٣٤٥ ½ ² 10e-5", "tabs\tand\r\nwindows\rlines\x0bvt\x0cff",
        "control \x00\x01\x1f\x7f chars", "<|endoftext|> is plain text here <|endoftext|>",
        "    leading spaces", "trailing spaces     ", "\n\n\n", " \n \n ",
        "x" * 3000, "supercalifragilistic" * 150, " " * 500 + "a",
        "".join(rng.choice("abcdefghij") for _ in range(2000)),
        "def f(x):\n    return x ** 2  # comment\n\n\tif a != b: pass",
    ]
    # Random unicode: ASCII, Latin-1, CJK, emoji and whitespace mixed.
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x4E00, 0x4E80), (0x1F600, 0x1F64F), (0x0400, 0x04FF)]
    for _ in range(30):
        chars = []
        for _ in range(rng.randint(1, 200)):
            if rng.random() < 0.15:
                chars.append(rng.choice(" \t\n  "))
            else:
                lo, hi = rng.choice(ranges)
                chars.append(chr(rng.randint(lo, hi)))
        texts.append("".join(chars))
    texts.extend(list(pydoc_data.topics.topics.values())[60:64])  # prose not seen in training
    return texts


def test_gpt2_reference_and_fast_match_hf(gpt2_files):
    vocab_file, merge_file = gpt2_files
    ref = hf_reference(vocab_file, merge_file)
    fast = GPT2BPETokenizer(vocab_file, merge_file, engine="fast")
    slow = GPT2BPETokenizer(vocab_file, merge_file, engine="reference")
    assert fast.engine == "fast" and slow.engine == "reference"
    for text in varied_texts():
        expected = ref.encode(text).ids
        assert slow.tokenize(text) == expected, text[:50]
        assert fast.tokenize(text) == expected, text[:50]
        assert fast.detokenize(expected) == text


def test_gpt2_tokenizer_properties(gpt2_files):
    vocab_file, merge_file = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    assert tok.vocab_size == len(vocab) == 1500
    assert tok.eod == vocab["<|endoftext|>"] == 1499
    assert tok.vocab == vocab and tok.inv_vocab == {v: k for k, v in vocab.items()}
    # GPT-2 layout: bytes first, one token per merge, EOD last; HF loads it too.
    assert max(len(k) for k, v in vocab.items() if v < 256) == 1


def test_build_tokenizer_from_args_namespace():
    import argparse

    args = argparse.Namespace(tokenizer_type="NullTokenizer", vocab_file=None, merge_file=None, vocab_size=10)
    assert build_tokenizer(args).vocab_size == 11
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("BertWordPiece")


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("3 17  5\n99") == [3, 17, 5, 99]
    assert tok.tokenize("") == []
    assert tok.detokenize([3, 17, 5]) == "3 17 5"
    assert tok.vocab["42"] == 42 and tok.inv_vocab[100] == "100"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("101")
    with pytest.raises(ValueError, match="integer"):
        tok.tokenize("a b")
    with pytest.raises(ValueError, match="--vocab-size"):
        NullTokenizer(0)


@pytest.mark.parametrize("v,div,tp", [(50257, 128, 1), (50257, 128, 2), (1500, 128, 8), (256, 128, 2), (7, 1, 1)])
def test_vocab_size_with_padding(v, div, tp):
    after = v  # Megatron-LM's loop, as the reference
    while after % (div * tp) != 0:
        after += 1
    assert vocab_size_with_padding(v, div, tp) == after


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_bad_files_clear_errors(gpt2_files, tmp_path):
    vocab_file, merge_file = gpt2_files
    with pytest.raises(FileNotFoundError, match="--vocab-file"):
        GPT2BPETokenizer(str(tmp_path / "nope.json"), merge_file)
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        GPT2BPETokenizer(vocab_file, str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--vocab-file"):
        GPT2BPETokenizer(None, merge_file)
    with pytest.raises(ValueError, match="invalid JSON"):
        GPT2BPETokenizer(_write(tmp_path / "v.json", "{not json"), merge_file)
    with pytest.raises(ValueError, match="non-negative integer"):
        GPT2BPETokenizer(_write(tmp_path / "v2.json", '{"a": "x"}'), merge_file)
    with pytest.raises(ValueError, match="byte tokens are missing"):
        GPT2BPETokenizer(_write(tmp_path / "v3.json", '{"a": 0, "<|endoftext|>": 1}'), merge_file)
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    no_eod = {k: v for k, v in vocab.items() if k != "<|endoftext|>"}
    with pytest.raises(ValueError, match="endoftext"):
        GPT2BPETokenizer(_write(tmp_path / "v4.json", json.dumps(no_eod)), merge_file)
    with pytest.raises(ValueError, match="line 2: merge .* not in the vocab"):
        GPT2BPETokenizer(vocab_file, _write(tmp_path / "m.txt", "#version: 0.2\nzzqq\u0100 xxyy\n"))
    with pytest.raises(ValueError, match="line 1: expected two tokens"):
        GPT2BPETokenizer(vocab_file, _write(tmp_path / "m2.txt", "a b c\n"))


def test_train_tokenizer_rejects_bad_jsonl(tmp_path):
    tool = load_train_tokenizer_tool()
    out = str(tmp_path / "out")
    cases = [('{"text": "ok"}\n{"txt": "wrong key"}\n', r"line 2: not a JSON object with keys \['text'\]"),
             ('{"text": "ok"}\n\n{"text": "a"\n', r"line 3: not a JSON object .*JSONDecodeError"),
             ('{"text": "ok"}\n[1, 2]\n', r"line 2: not a JSON object"),
             ('{"text": 5}\n', r"line 1: key 'text' is not a string")]
    for i, (text, pattern) in enumerate(cases):
        p = _write(tmp_path / f"bad{i}.jsonl", text)
        with pytest.raises(SystemExit) as err:
            tool.main(["--input", p, "--vocab-size", "300", "--output-dir", out])
        msg = str(err.value.code)
        assert msg.startswith(f"train_tokenizer.py: error: --input {p} ") and "\n" not in msg
        assert re.search(pattern, msg), msg
    p = _write(tmp_path / "bad.bin.jsonl", "")
    with open(p, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(SystemExit, match=r"^train_tokenizer.py: error: --input .* line 2: not UTF-8"):
        tool.main(["--input", p, "--vocab-size", "300", "--output-dir", out])
    good = _write(tmp_path / "good.jsonl", '{"text": "hello world"}\n')
    with pytest.raises(SystemExit, match=r"^train_tokenizer.py: error: --vocab-size must be at least 257 .*got 100$"):
        tool.main(["--input", good, "--vocab-size", "100", "--output-dir", out])
    with pytest.raises(SystemExit, match=r"^train_tokenizer.py: error: --input .*missing.jsonl: no such file$"):
        tool.main(["--input", str(tmp_path / "missing.jsonl"), "--vocab-size", "300", "--output-dir", out])
    assert not os.path.exists(out)

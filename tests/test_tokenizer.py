"""stmvl.data.text: UMT caption cleaning and the WordPiece tokenizer from a local vocab.txt."""

import pytest
import torch

from stmvl.data.text import Tokenizer, clean_caption, default_vocab_path, minilm_folder


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_clean_caption_follows_umt_rules():
    assert clean_caption("  A Dog-runs / FAST,  (outside)!\n") == "a dog runs fast outside"
    assert clean_caption("it's a \"good\" day; isn't it?") == "its a good day isnt it"
    with pytest.raises(TypeError, match="str"):
        clean_caption(None)


def test_packaged_vocab_size_and_known_ids(tok):
    assert default_vocab_path().name == "vocab.txt"
    assert (minilm_folder() / "config.json").is_file()
    assert tok.vocab_size == 30522
    out = tok(["a dog runs"])
    assert out["input_ids"].tolist() == [[101, 1037, 3899, 3216, 102]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 101, 102, 103)
    assert tok.special_ids == {0, 100, 101, 102, 103}


def test_padding_truncation_and_decode(tok):
    out = tok(["A dog runs fast in the park!", "x"], max_length=5)
    assert out["input_ids"].dtype == torch.long
    # Truncation keeps the final [SEP]; the short caption is padded to the batch's longest.
    assert out["input_ids"].tolist() == [[101, 1037, 3899, 3216, 102], [101, 1060, 102, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert tok.decode(tok("Unbelievably, a CAT!")["input_ids"][0]) == "unbelievably a cat"


def test_a_batch_costs_a_fixed_number_of_torch_calls(tok):
    # FlopCounterMode intercepts every torch call in Python; a cache fill tokenizes thousands of captions under it
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        out = tok(["a dog runs", "a red circle moves left", "x"] * 50)
    assert Counter.calls <= 4
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
    assert out["attention_mask"].sum(1).tolist() == [5, 7, 3] * 50 and out["input_ids"][2, 3:].eq(0).all()


def test_matches_transformers_tokenizer_on_packaged_folder(tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast.from_pretrained(str(minilm_folder()))
    captions = ["a dog runs", "unbelievably tokenization resume", "two people play tennis on a court"]
    ours = tok(captions, max_length=64)
    theirs = reference(captions, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_vocab_size_is_asserted(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    small = Tokenizer(str(tmp_path), expected_vocab_size=7)
    assert small(["a dog cat"])["input_ids"].tolist() == [[2, 5, 6, 1, 3]]
    with pytest.raises(ValueError, match="expected 30522"):
        Tokenizer(str(vocab), expected_vocab_size=30522)
    with pytest.raises(FileNotFoundError, match="vocab"):
        Tokenizer(str(tmp_path / "missing"))

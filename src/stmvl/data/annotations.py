"""Annotation files (UMT format, JSON list or JSONL), validated and stored packed.

Record kinds (README.md, Recipes):

- ``video``     pretraining video-text  ``{"video": rel_path, "caption": str}``
- ``image``     pretraining image-text  ``{"image": rel_path, "caption": str}``
- ``retrieval`` ``{"video": rel_path, "caption": str | [str]}`` (optional ``"gt"``: ground-truth video indices)
- ``qa``        ``{"video", "question", "answer": str | [str], "question_id"}`` plus an answer-list JSON
- ``mc``        ``{"video", "caption": [options], "answer": int}``
- ``probe``     ``{"video", "caption": str, "foil": str}`` (synthetic temporal probe)

Hostile values are rejected at load with the file, record index and field named (AnnotationError, a UserError):
text that is not UTF-8, JSON nested too deeply to parse, clip bounds that are not finite seconds in
[0, MAX_CLIP_SECONDS], captions that the caption cleaning (``stmvl.data.text.clean_caption``) empties, and strings
holding lone surrogates (not Unicode text; they cannot be stored as UTF-8).

Records are kept as one bytes buffer of compact JSON plus an int64 offset array (:class:`PackedRecords`), so a
DataLoader worker that inherits or unpickles the dataset gets two numpy arrays instead of millions of Python
dicts (whose reference counts would make copy-on-write fork pages private, duplicating the annotation per worker).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from stmvl.errors import UserError

from .text import clean_caption

MEDIA_TYPES = ("video", "image")
# Clip bounds beyond this many seconds (11.6 days) are no real clip: rejected at load, before any arithmetic on them
MAX_CLIP_SECONDS = 1e6
# the fields read as text (tokenized after UMT's caption cleaning), per record kind
_TEXT_FIELDS = ("caption", "foil", "question")
# characters UMT's caption cleaning deletes or turns into spaces (stmvl.data.text.clean_caption)
_REMOVED_BY_CLEANING = ",.'!?\"()*#:;~-/ \t\n\r\f\v"


class AnnotationError(UserError):
    """An annotation file or record is malformed; the message names the file, record index and field."""


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_str_or_str_list(value: Any) -> bool:
    return _is_str(value) or (isinstance(value, list) and len(value) > 0 and all(_is_str(v) for v in value))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_str(v) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_int(value) or _is_str(value)


# kind -> {field: (validator, description of the expected type)}; every listed field is required.
_SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "video": {"video": (_is_str, "a non-empty str path"), "caption": (_is_str, "a non-empty str")},
    "image": {"image": (_is_str, "a non-empty str path"), "caption": (_is_str, "a non-empty str")},
    "retrieval": {"video": (_is_str, "a non-empty str path"), "caption": (_is_str_or_str_list, "a str or list of str")},
    "qa": {
        "video": (_is_str, "a non-empty str path"),
        "question": (_is_str, "a non-empty str"),
        "answer": (_is_str_or_str_list, "a str or list of str"),
        "question_id": (_is_id, "an int or str"),
    },
    "mc": {"video": (_is_str, "a non-empty str path"), "caption": (_is_str_list, "a list of str"),
           "answer": (_is_int, "an int")},
    "probe": {"video": (_is_str, "a non-empty str path"), "caption": (_is_str, "a non-empty str"),
              "foil": (_is_str, "a non-empty str")},
}
# optional fields that must have the right type when present
def _is_seconds(value: Any, lowest_open: bool) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    # compare before converting: an int of 400 digits is not a float, and NaN fails every comparison
    in_range = (0 < value if lowest_open else 0 <= value) and value <= MAX_CLIP_SECONDS
    return in_range and math.isfinite(value)


_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "foil": (_is_str, "a non-empty str"),
    "start": (lambda v: _is_seconds(v, lowest_open=False), f"a finite number of seconds in [0, {MAX_CLIP_SECONDS:g}]"),
    "end": (lambda v: _is_seconds(v, lowest_open=True), f"a finite number of seconds in (0, {MAX_CLIP_SECONDS:g}]"),
}
KINDS = tuple(_SCHEMAS)


def media_key(kind: str) -> str:
    """The record field holding the media path for a record kind (``image`` for image corpora)."""
    return "image" if kind == "image" else "video"


def read_text_file(path: Path, what: str = "annotation file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); AnnotationError naming the file, line and byte
    offset of the first byte that is not UTF-8 (a file saved as latin-1 or cp1252, say)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise AnnotationError(f"{path}: {what} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                              f"(line {line}); save it as UTF-8") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise AnnotationError(f"{where}: JSON nested too deeply to parse") from None
    except ValueError as err:  # JSONDecodeError, and ints over Python's digit limit
        raise AnnotationError(f"{where}: invalid JSON ({err})") from None


def read_records(path: str | Path) -> list[dict]:
    """Parse a JSON list or a JSONL file into a list of dicts (not yet validated).

    Raises AnnotationError naming the file (and the line for JSONL) when it cannot be read or parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    text = read_text_file(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = _parse_json(text, str(path))
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_parse_json(line, f"{path}: line {line_no}"))
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of records or JSONL, got {type(records).__name__}")
    return records


def validate_record(record: Any, kind: str, path: str | Path, index: int) -> None:
    """Check one record against the schema of ``kind``; raise AnnotationError naming file, index and field."""
    if kind not in _SCHEMAS:
        raise ValueError(f"unknown annotation kind {kind!r}; expected one of {KINDS}")
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, (check, expected) in _SCHEMAS[kind].items():
        if field not in record:
            raise AnnotationError(f"{where}: missing field {field!r} (required for {kind} annotations)")
        if not check(record[field]):
            raise AnnotationError(f"{where}: field {field!r} must be {expected}, got {record[field]!r}")
    if kind == "mc" and not 0 <= record["answer"] < len(record["caption"]):
        raise AnnotationError(
            f"{where}: field 'answer' = {record['answer']} is not an index into the {len(record['caption'])} options"
        )
    validate_optional_fields(record, where)


def validate_optional_fields(record: dict, where: str) -> None:
    """The checks every record kind shares (also applied to shard metadata): ``foil``, ``start`` and ``end`` when
    present (finite seconds, start < end), and text fields that keep some text after caption cleaning."""
    for field, (check, expected) in _OPTIONAL.items():
        if field in record and not check(record[field]):
            raise AnnotationError(f"{where}: field {field!r} must be {expected}, got {record[field]!r}")
    if "start" in record and "end" in record and record["end"] <= record["start"]:
        raise AnnotationError(
            f"{where}: field 'end' ({record['end']}) must be greater than 'start' ({record['start']})")
    _check_texts(record, where)


def _check_texts(record: dict, where: str) -> None:
    """Every caption, foil and question must keep some text after UMT's caption cleaning (the tokenizer applies it):
    one that is only punctuation or whitespace would train on an empty sentence."""
    for field in _TEXT_FIELDS:
        value = record.get(field)
        texts = value if isinstance(value, list) else [value]
        for i, text in enumerate(texts):
            if isinstance(text, str) and not _survives_cleaning(text):
                label = f"{field!r}[{i}]" if isinstance(value, list) else repr(field)
                raise AnnotationError(f"{where}: field {label} = {text!r} is empty after caption cleaning "
                                      f"(punctuation and whitespace only)")


def _survives_cleaning(text: str) -> bool:
    """Whether ``clean_caption(text)`` is non-empty; a fast exact test first (one kept character suffices), the
    cleaning itself only for the rare text whose first character past the removable ones is whitespace."""
    rest = text.strip(_REMOVED_BY_CLEANING)
    if rest and not rest[0].isspace():
        return True
    return bool(clean_caption(text))


def unencodable_field(value: Any, name: str = "") -> str | None:
    """The field path of the first string (key or value) in ``value`` that UTF-8 cannot encode, else None."""
    stack = [(name, value)]
    while stack:
        label, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return f"{label or 'a key'} (lone surrogate {item[err.start]!r} at character {err.start})"
        elif isinstance(item, dict):
            stack += [(f"{label}.{k}" if label else repr(k), v) for k, v in item.items()]
            stack += [(f"a key of {label or 'the record'}", k) for k in item]
        elif isinstance(item, list):
            stack += [(f"{label}[{i}]", v) for i, v in enumerate(item)]
    return None


class PackedRecords:
    """An immutable sequence of JSON records stored as one uint8 buffer + int64 offsets.

    ``records[i]`` decodes record i into a fresh dict (a few microseconds); nothing else is kept as Python objects.
    """

    def __init__(self, records: Iterable[dict], source: str = "<memory>"):
        chunks: list[bytes] = []
        offsets = [0]
        for index, record in enumerate(records):
            blob = _encode_record(record, source, index)
            chunks.append(blob)
            offsets.append(offsets[-1] + len(blob))
        self._buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.source = source

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records of {self.source}")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._buffer[start:end].tobytes())

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed buffers."""
        return int(self._buffer.nbytes + self._offsets.nbytes)


def _encode_record(record: Any, source: str, index: int) -> bytes:
    """Compact UTF-8 JSON of one record; AnnotationError naming the record when it cannot be stored."""
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise AnnotationError(f"{source}: record {index}: field {unencodable_field(record)} is not valid Unicode "
                              f"text") from None
    except RecursionError:
        raise AnnotationError(f"{source}: record {index}: nested too deeply to store") from None


def load_annotations(path: str | Path, kind: str) -> PackedRecords:
    """Read, validate and pack an annotation file of the given kind (see module docstring).

    Raises AnnotationError (file, record index, field) on the first malformed record, or when the file is empty.
    """
    records = read_records(path)
    if not records:
        raise AnnotationError(f"{path}: annotation file has no records")
    for index, record in enumerate(records):
        validate_record(record, kind, path, index)
    return PackedRecords(records, source=str(path))


def load_answer_list(path: str | Path) -> list[str]:
    """A QA answer list: JSON list of answer strings (or a dict answer -> index, ordered by index)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: answer list not found")
    data = _parse_json(read_text_file(path, "answer list"), str(path))
    if isinstance(data, dict):
        data = [answer for answer, _ in sorted(data.items(), key=lambda item: item[1])]
    if not isinstance(data, list) or not data:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of answers")
    for i, answer in enumerate(data):
        if not _is_str(answer):
            raise AnnotationError(f"{path}: answer {i} must be a non-empty str, got {answer!r}")
    if len(set(data)) != len(data):
        raise AnnotationError(f"{path}: the answer list contains duplicates")
    return list(data)


@dataclass
class CorpusSpec:
    """One corpus of a recipe: its annotation file, media root, media type and sampling weight."""

    annotation: str
    media_root: str
    media_type: str = "video"
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_TYPES:
            raise ValueError(f"corpus {self.name or self.annotation}: media_type must be one of {MEDIA_TYPES}, "
                             f"got {self.media_type!r}")
        if not self.weight > 0:
            raise ValueError(f"corpus {self.name or self.annotation}: weight must be > 0, got {self.weight}")
        if not self.name:
            self.name = Path(self.annotation).stem


def id_offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each corpus's global sample-id range when corpora are concatenated: [0, n0, n0+n1, ...][:-1].

    A dataset built with ``id_offset=id_offsets(sizes)[k]`` returns ``sample_id = id_offset + index``, so ids are unique
    across concatenated corpora (VTC treats equal ids as positives).
    """
    offsets, total = [], 0
    for size in sizes:
        if size < 0:
            raise ValueError(f"corpus sizes must be >= 0, got {list(sizes)}")
        offsets.append(total)
        total += size
    return offsets

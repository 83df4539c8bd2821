"""Annotation parsing, validation messages, packing and global ids."""

import json

import pytest

from stmvl.data.annotations import (AnnotationError, CorpusSpec, PackedRecords, id_offsets, load_annotations,
                                    load_answer_list, read_records)
from stmvl.errors import UserError


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_json_and_jsonl_give_the_same_packed_records(tmp_path):
    records = [{"video": f"v{i}.mp4", "caption": f"caption number {i} é"} for i in range(5)]
    as_json = _write_json(tmp_path / "a.json", records)
    as_jsonl = tmp_path / "a.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    packed_json, packed_jsonl = load_annotations(as_json, "video"), load_annotations(as_jsonl, "video")
    assert list(packed_json) == records == list(packed_jsonl)
    assert packed_json[-1] == records[-1]
    assert packed_json.source == str(as_json)
    with pytest.raises(IndexError, match="out of range"):
        packed_json[5]


def test_packed_records_hold_no_python_objects_per_record():
    packed = PackedRecords({"video": f"{i}.mp4", "caption": "x" * 10} for i in range(1000))
    # two numpy buffers only: ~36 bytes of JSON + 8 bytes of offset per record
    assert set(vars(packed)) == {"_buffer", "_offsets", "source"}
    assert packed.nbytes < 1000 * 50
    assert packed[999]["video"] == "999.mp4"


def test_missing_field_names_file_record_and_field(tmp_path):
    path = _write_json(tmp_path / "bad.json", [{"video": "a.mp4", "caption": "ok"}, {"video": "b.mp4"}])
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "video")
    message = str(info.value)
    assert str(path) in message and "record 1" in message and "'caption'" in message


def test_wrong_types_and_values_are_rejected_with_the_field(tmp_path):
    cases = [
        ("video", {"video": 3, "caption": "x"}, "'video'"),
        ("image", {"image": "a.jpg", "caption": ""}, "'caption'"),
        ("retrieval", {"video": "a.mp4", "caption": ["x", 2]}, "'caption'"),
        ("qa", {"video": "a.mp4", "question": "q", "answer": "a"}, "'question_id'"),
        ("mc", {"video": "a.mp4", "caption": ["a", "b"], "answer": 2}, "'answer'"),
        ("video", {"video": "a.mp4", "caption": "x", "start": 3.0, "end": 1.0}, "'end'"),
    ]
    for i, (kind, record, field) in enumerate(cases):
        path = _write_json(tmp_path / f"c{i}.json", [record])
        with pytest.raises(AnnotationError, match=f"record 0: .*{field}"):
            load_annotations(path, kind)


def test_unparseable_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"video": "a.mp4", "caption": "x"}\n{not json}\n')
    with pytest.raises(AnnotationError, match="broken.jsonl: line 2"):
        read_records(path)
    with pytest.raises(AnnotationError, match="not found"):
        read_records(tmp_path / "missing.json")
    empty = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(AnnotationError, match="no records"):
        load_annotations(empty, "video")


def test_answer_list_and_corpus_spec_and_id_offsets(tmp_path):
    assert load_answer_list(_write_json(tmp_path / "ans.json", ["yes", "no"])) == ["yes", "no"]
    assert load_answer_list(_write_json(tmp_path / "ans2.json", {"no": 1, "yes": 0})) == ["yes", "no"]
    with pytest.raises(AnnotationError, match="duplicates"):
        load_answer_list(_write_json(tmp_path / "dup.json", ["a", "a"]))
    assert CorpusSpec("data/webvid.json", "/media").name == "webvid"
    with pytest.raises(ValueError, match="media_type"):
        CorpusSpec("a.json", "/m", media_type="audio")
    assert id_offsets([3, 0, 5, 2]) == [0, 3, 3, 8]


# ---------------------------------------------------------------------------------------------- hostile input


def test_a_file_that_is_not_utf8_names_the_file_byte_and_line(tmp_path):
    path = tmp_path / "latin1.json"
    text = '[{"video": "a.mp4", "caption": "x"},\n {"video": "b.mp4", "caption": "un café"}]'
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("é")  # ASCII before it: characters and bytes agree
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "video")
    assert str(info.value) == (f"{path}: annotation file is not UTF-8 text: byte 0xe9 at offset {offset} (line 2); "
                               f"save it as UTF-8")
    assert isinstance(info.value, UserError)  # training commands print it as one line and exit 2
    answers = tmp_path / "answers.json"
    answers.write_bytes('["oui", "très"]'.encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"answers\.json: answer list is not UTF-8 text: byte 0xe8 at offset 11 \(line 1\)"):
        load_answer_list(answers)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"video": "a.mp4", "caption": "x"}]).encode())
    assert list(load_annotations(path, "video")) == [{"video": "a.mp4", "caption": "x"}]


CLIP_BOUNDS = [
    ('"end": Infinity', "'end' must be a finite number of seconds in (0, 1e+06], got inf"),
    ('"start": 1e308, "end": 1e309', "'start' must be a finite number of seconds in [0, 1e+06], got 1e+308"),
    ('"start": 1e308', "'start' must be a finite number of seconds in [0, 1e+06], got 1e+308"),
    ('"start": NaN', "'start' must be a finite number of seconds in [0, 1e+06], got nan"),
    ('"end": NaN', "'end' must be a finite number of seconds in (0, 1e+06], got nan"),
    ('"start": -Infinity', "'start' must be a finite number of seconds in [0, 1e+06], got -inf"),
    ('"start": -1', "'start' must be a finite number of seconds in [0, 1e+06], got -1"),
    ('"end": 0', "'end' must be a finite number of seconds in (0, 1e+06], got 0"),
    ('"end": 1' + "0" * 400, "'end' must be a finite number of seconds in (0, 1e+06], got 1" + "0" * 400),
    ('"start": "3"', "'start' must be a finite number of seconds in [0, 1e+06], got '3'"),
    ('"start": true', "'start' must be a finite number of seconds in [0, 1e+06], got True"),
    ('"start": 4, "end": 4', "'end' (4) must be greater than 'start' (4)"),
    ('"start": 5.5, "end": 2', "'end' (2) must be greater than 'start' (5.5)"),
]


@pytest.mark.parametrize("fields, message", CLIP_BOUNDS)
def test_clip_bounds_that_are_no_finite_seconds_are_rejected_at_load(tmp_path, fields, message):
    path = tmp_path / "clips.jsonl"
    path.write_text('{"video": "a.mp4", "caption": "fine", "start": 1, "end": 2}\n'
                    f'{{"video": "b.mp4", "caption": "hostile", {fields}}}\n')
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "video")
    assert str(info.value) == f"{path}: record 1: field {message}"


def test_a_lone_surrogate_is_rejected_naming_record_and_field(tmp_path):
    path = tmp_path / "surrogate.json"
    path.write_text('[{"video": "a.mp4", "caption": "fine"}, {"video": "b.mp4", "caption": "bad \\ud800 text"}]')
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "video")
    assert str(info.value) == (f"{path}: record 1: field 'caption' (lone surrogate '\\ud800' at character 4) is not "
                               f"valid Unicode text")
    path.write_text('[{"video": "a.mp4", "caption": ["ok", "x \\udfff"]}]')
    with pytest.raises(AnnotationError, match=r"record 0: field 'caption'\[1\] \(lone surrogate '\\udfff' at "):
        load_annotations(path, "retrieval")


def test_json_nested_too_deeply_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000)
    with pytest.raises(AnnotationError) as info:
        read_records(path)
    assert str(info.value) == f"{path}: JSON nested too deeply to parse"
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"video": "a.mp4", "caption": "x"}\n' + '{"a": ' * 100000 + "\n")
    with pytest.raises(AnnotationError) as info:
        read_records(jsonl)
    assert str(info.value) == f"{jsonl}: line 2: JSON nested too deeply to parse"
    huge = tmp_path / "digits.json"
    huge.write_text('[{"video": "a.mp4", "caption": "x", "start": 1' + "0" * 5000 + "}]")
    with pytest.raises(AnnotationError, match=r"digits\.json: invalid JSON \(Exceeds the limit"):
        read_records(huge)


@pytest.mark.parametrize("kind, record, label", [
    ("video", {"video": "a.mp4", "caption": " ... "}, "'caption' = ' ... '"),
    ("video", {"video": "a.mp4", "caption": "?!;:"}, "'caption' = '?!;:'"),
    ("video", {"video": "a.mp4", "caption": "- / -\u3000"}, "'caption' = '- / -\\u3000'"),
    ("video", {"video": "a.mp4", "caption": "ok", "foil": "()"}, "'foil' = '()'"),
    ("retrieval", {"video": "a.mp4", "caption": ["a dog", "\t#*~"]}, "'caption'[1] = '\\t#*~'"),
    ("qa", {"video": "a.mp4", "question": "??", "answer": "yes", "question_id": 1}, "'question' = '??'"),
    ("mc", {"video": "a.mp4", "caption": ["a", "..."], "answer": 0}, "'caption'[1] = '...'"),
])
def test_captions_that_clean_to_nothing_are_rejected_naming_the_record(tmp_path, kind, record, label):
    path = _write_json(tmp_path / "empty_text.json", [record])
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, kind)
    assert str(info.value) == (f"{path}: record 0: field {label} is empty after caption cleaning (punctuation and "
                               f"whitespace only)")


def test_captions_that_keep_text_after_cleaning_are_accepted(tmp_path):
    records = [{"video": "a.mp4", "caption": c} for c in ("...a", "-7-", "\u3000ü", "émigré", "「猫」")]
    assert list(load_annotations(_write_json(tmp_path / "ok.json", records), "video")) == records

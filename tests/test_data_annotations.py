"""Annotation parsing, validation messages, packing and global ids."""

import json

import pytest

from stmvl.data.annotations import (AnnotationError, CorpusSpec, PackedRecords, id_offsets, load_annotations,
                                    load_answer_list, read_records)


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

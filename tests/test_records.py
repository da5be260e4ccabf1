import csv
import json

import pytest

from attention_map.records import DataFileError, RecordError, prompts_of, read_records


def test_gemex_records(cxr):
    records, errors = read_records(cxr / "vqa" / "gemex_style_closed_ended.jsonl")
    assert errors == [] and len(records) == 22
    first = records[0]
    assert first.image_path == "nih/00000820_000.png" and first.q_id == "0" and first.row_id == "row_7"
    assert first.regions == ("lung opacity", "lung opacity") and first.answer == "Yes."
    assert [p.text for p in prompts_of(first, "question")] == [first.question]
    assert [(p.text, p.region) for p in prompts_of(first, "regions")] == [("lung opacity", 0), ("lung opacity", 1)]
    assert len(prompts_of(first, "both")) == 3


def test_json_list_with_multi_choice_answers(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"image_path": "a.png", "question": "Which?", "answer": ["A", "C"],
                                 "choices": ["A: x", "B: y", "C: z"], "q_id": 4}]))
    (record,), errors = read_records(path)
    assert errors == [] and json.loads(record.answer) == ["A", "C"] and json.loads(record.choices)[2] == "C: z"
    assert record.q_id == "4"


def test_csv_with_quotes_commas_newlines_and_bom(tmp_path):
    path = tmp_path / "records.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "question", "answer", "prompt"])
        writer.writerow(["a.png", 'Is the "heart", enlarged?\nSecond line', "Yes, mildly.", ""])
        writer.writerow(["b.png", "Plain?", "No.", "left lung"])
    records, errors = read_records(path)
    assert errors == []
    assert records[0].question == 'Is the "heart", enlarged?\nSecond line' and records[0].answer == "Yes, mildly."
    assert records[0].line == 2 and records[1].line == 4          # the quoted newline takes a line
    assert [p.text for p in prompts_of(records[1], "question")] == ["left lung"]
    assert [r.q_id for r in records] == ["0", "1"]


def test_a_csv_quote_left_open_costs_its_own_row_not_the_rows_it_would_swallow(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text('image_path,question,answer\n\nd.png,"two\nlines",No\n'                   # well quoted
                    'a.png,"never closed?,Yes\nb.png,Plain?,No\nc.png,Also plain?,No\n')      # to the end of the file
    other = tmp_path / "other.csv"
    other.write_text('image_path,question,answer\na.png,"closed too late?,Yes\nb.png,"Plain?",No\nc.png,q?,No\n')
    records, errors = read_records(path)
    assert [(r.line, r.image_path, r.question) for r in records] == [
        (3, "d.png", "two\nlines"), (6, "b.png", "Plain?"), (7, "c.png", "Also plain?")]
    assert errors == [RecordError(5, "a.png", "question", "a quote opened here is not closed (unexpected end of "
                                  "data): it would take lines 5 to 7 as one row; rows are read on from line 6")]
    records, errors = read_records(other)
    assert [(r.line, r.image_path, r.question) for r in records] == [(3, "b.png", "Plain?"), (4, "c.png", "q?")]
    assert [(e.line, e.field) for e in errors] == [(2, "question")] and "lines 2 to 3" in errors[0].reason


def test_csv_without_required_columns_stops_the_run(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("image_path,question\na.png,q\n")
    with pytest.raises(DataFileError, match="records.csv:1: missing column.*answer"):
        read_records(path)


def test_a_file_with_no_json_line_is_refused_as_a_whole(tmp_path):
    path = tmp_path / "records.txt"
    path.write_text("image_path,question,answer\na.png,q?,yes\n")       # a CSV under another name
    with pytest.raises(DataFileError, match=r"records.txt: no line is a JSON record \(.*a CSV whose name ends in .csv"):
        read_records(path)


def test_broken_jsonl_line_is_one_record_error(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"image_path": "a.png", "question": "q", "answer": "a"}\n{"image_path": \n'
                    '{"question": "no image"}\n{"image_path": "c.png", "question": "q", "answer": "a"}\n')
    records, errors = read_records(path)
    assert [r.image_path for r in records] == ["a.png", "c.png"]
    assert [(e.line, e.field) for e in errors] == [(2, "json"), (3, "image_path")]

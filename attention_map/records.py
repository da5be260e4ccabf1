"""Read (image, question) records from GEMeX JSONL/JSON or CSV, and expand them into heatmap prompts."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

REQUIRED_CSV_COLUMNS = ("image_path", "question", "answer")
CLASSIFIER_CSV_COLUMNS = ("image_path",)   # a classifier needs no question; an optional `target` column


class DataFileError(ValueError):
    """The data file as a whole cannot be read (not one bad record): the run stops before any work."""


@dataclass(frozen=True)
class Record:
    line: int                 # line (JSONL, CSV) or item number (JSON list) in DATA_FILE, 1-based, for messages
    image_path: str
    question: str
    answer: str               # as the dataset has it (`answer`, or `answer_gt`); a list answer (multi-choice) is kept
                              # as JSON text
    q_id: str
    row_id: str
    prompt: str = ""          # CSV only: an explicit prompt that replaces the question
    regions: tuple[str, ...] = ()
    choices: str = ""         # JSON text of the choices list, when the record has one
    target: str = ""          # a classifier's output to explain (index or name); empty: TARGETS decides


@dataclass(frozen=True)
class Prompt:
    """One heatmap to make: a record and what the model is asked about (a prompt, or a classifier's target)."""
    record: Record
    text: str
    region: int | None = None   # index into record.regions for a region prompt


@dataclass(frozen=True)
class RecordError:
    """One record that cannot be used; the run goes on without it."""
    line: int
    image_path: str
    field: str
    reason: str


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def q_id_of(item: dict, index: int) -> str:
    """The item's q_id, or its position among the file's items when it has none."""
    q_id = item.get("q_id")
    return str(index) if q_id is None or str(q_id).strip() == "" else str(q_id).strip()


def _from_mapping(item: dict, line: int, index: int) -> Record:
    """Build a Record from a JSON object or CSV row; raise ValueError(field, reason)."""
    image_path = item.get("image_path")
    if not isinstance(image_path, str) or not image_path.strip():
        raise ValueError("image_path", "missing or empty")
    question = item.get("question") or ""
    if not isinstance(question, str):
        raise ValueError("question", f"must be text, got {type(question).__name__}")
    regions = item.get("visual_regions") or ()
    if isinstance(regions, str):
        regions = json.loads(regions) if regions.strip().startswith("[") else [regions]
    if not isinstance(regions, (list, tuple)) or not all(isinstance(r, str) for r in regions):
        raise ValueError("visual_regions", "must be a list of region names")
    answer = _as_text(item.get("answer", item.get("answer_gt")))
    return Record(line=line, image_path=image_path.strip(), question=question, answer=answer,
                  q_id=q_id_of(item, index), row_id=_as_text(item.get("row_id")), prompt=_as_text(item.get("prompt")).strip(),
                  regions=tuple(regions), choices=_as_text(item.get("choices")) if item.get("choices") else "",
                  target=_as_text(item.get("target")).strip())


def _undecodable_field(item: dict) -> tuple[str, int] | None:
    """(field, byte) of the first text that was not UTF-8 in the file (read with errors='surrogateescape')."""
    for name, value in item.items():
        for char in value if isinstance(value, str) else ():
            if "\udc80" <= char <= "\udcff":
                return str(name), ord(char) - 0xDC00
    return None


def _records_from_items(items, path: Path) -> tuple[list[Record], list[RecordError]]:
    records, errors = [], []
    for index, (line, item) in enumerate(items):
        if isinstance(item, RecordError):
            errors.append(item)
            continue
        if not isinstance(item, dict):
            errors.append(RecordError(line, "", "record", f"expected an object, got {type(item).__name__}"))
            continue
        undecodable = _undecodable_field(item)
        if undecodable:
            errors.append(RecordError(line, _as_text(item.get("image_path")).encode(errors="replace").decode(),
                                      undecodable[0], f"not UTF-8 text (byte 0x{undecodable[1]:02X}); "
                                                      f"save {path.name} as UTF-8"))
            continue
        try:
            records.append(_from_mapping(item, line, index))
        except ValueError as error:
            field, reason = error.args if len(error.args) == 2 else ("record", str(error))
            errors.append(RecordError(line, _as_text(item.get("image_path")), field, reason))
    return records, errors


def _json_lines(path: Path):
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            line = text.rstrip("\r\n")      # a column past the newline would name the next line's first
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                end = ", where the line ends" if error.pos >= len(line.rstrip()) else ""    # a record cut short
                yield number, RecordError(number, "", "json",
                                          f"not valid JSON ({error.msg} at column {error.colno}{end})")


def _csv_rows(path: Path, required: tuple[str, ...]):
    """(line, row) for each row of the CSV, named by the line it starts on. A quoted field may span lines; one whose
    quote is left open would swallow the rows after it, so that row is a RecordError and reading goes on at the line
    after the one it starts on."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        lines = list(handle)        # as csv reads them: a line break inside quotes ends a line here too
    header = csv.DictReader(lines)
    fields = header.fieldnames or []
    missing = [c for c in required if c not in fields and not (c == "answer" and "answer_gt" in fields)]
    if missing:
        raise DataFileError(f"{path}:1: missing column(s) {', '.join(missing)} "
                            f"(a CSV needs {','.join(required)})")
    start = header.line_num         # index of the first line not yet read
    while start < len(lines):
        reader = csv.DictReader(lines[start:], fieldnames=fields)
        read = 0
        for row in reader:
            first = start + read
            while not lines[first].strip("\r\n"):       # the blank lines csv skips before the row
                first += 1
            read = reader.line_num
            end = start + read
            unclosed = _unclosed_quote(lines[first:end]) if end - first > 1 else None
            if unclosed:
                yield first + 1, _open_quote_error(lines[first], fields, first + 1, end, unclosed)
                start = first + 1
                break
            yield first + 1, row
        else:
            return


def _unclosed_quote(lines: list[str]) -> str | None:
    """csv's complaint about a row that spans `lines` when read strictly: a quote that never closes, or closes
    where no field ends; None for a well-quoted row."""
    try:
        list(csv.reader(lines, strict=True))
    except csv.Error as error:
        return str(error)
    return None


def _open_quote_error(text: str, fields: list[str], line: int, end: int, complaint: str) -> RecordError:
    """The RecordError of a row whose quote, opened on its first line `text`, is not closed as CSV expects."""
    values = next(csv.reader([text]))        # the field whose quote is open is the last one of its first line
    field = fields[len(values) - 1] if len(values) <= len(fields) else "record"
    image_path = values[fields.index("image_path")] if "image_path" in fields[:len(values) - 1] else ""
    return RecordError(line, image_path, field, f"a quote opened here is not closed ({complaint}): it would take "
                       f"lines {line} to {end} as one row; rows are read on from line {line + 1}")


def read_items(path: Path, required: tuple[str, ...] = REQUIRED_CSV_COLUMNS) -> list[tuple[int, object]]:
    """(line, item) for every item of `path` in file order: a dict per CSV row or JSON object, a RecordError for a
    JSONL line that is not JSON. Raises DataFileError when the file as a whole is unreadable (encoding, CSV header,
    JSON syntax of a list)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            return list(_csv_rows(path, required))
        if path.suffix.lower() == ".json":
            text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
            if text.lstrip().startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataFileError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
                return list(enumerate(items, start=1))
        items = list(_json_lines(path))
        if items and all(isinstance(item, RecordError) for _, item in items):   # a CSV named .txt, say
            raise DataFileError(f"{path}: no line is a JSON record (records are GEMeX JSONL or JSON, or a CSV "
                                f"whose name ends in .csv)")
        return items
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def read_records(path: Path,
                 required: tuple[str, ...] = REQUIRED_CSV_COLUMNS) -> tuple[list[Record], list[RecordError]]:
    """All usable records of `path`, in file order, and the records that cannot be used; a CSV must have the
    `required` columns.

    Raises DataFileError when the file as a whole is unreadable (see read_items).
    """
    return _records_from_items(read_items(path, required), Path(path))


YES_NO_WORDS = {"yes", "no"}
AUXILIARIES = ("is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could", "will",
               "would", "should", "may", "might")


def is_yes_no(record: Record) -> bool:
    """Whether the record's question is answered yes or no: its answer is, or the question opens with an auxiliary
    verb ('Is there ...?')."""
    if record.answer.strip().strip(".").lower() in YES_NO_WORDS:
        return True
    words = record.question.strip().split(maxsplit=1)
    return bool(words) and words[0].lower() in AUXILIARIES


def prompts_of(record: Record, source: str) -> list[Prompt]:
    """The heatmaps a record asks for under PROMPT_SOURCE=question|regions|both."""
    prompts = []
    if source in ("question", "both"):
        prompts.append(Prompt(record, record.prompt or record.question))
    if source in ("regions", "both"):
        prompts.extend(Prompt(record, name, j) for j, name in enumerate(record.regions))
    return prompts


def targets_of(record: Record, targets: tuple[str, ...], target_names: tuple[str, ...]) -> list[Prompt]:
    """The heatmaps a record asks of a classifier: its own `target`, else TARGETS, else every output TARGET_NAMES
    names, else the class the model predicts ('')."""
    chosen = [record.target] if record.target else list(targets) or list(target_names) or [""]
    return [Prompt(record, target) for target in chosen]

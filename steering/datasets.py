"""Preference data for building and judging steering vectors: (prompt, preferred answer, dispreferred answer).

Two file formats: JSON Lines with exactly the fields ``prompt``, ``preferred`` and ``dispreferred`` per line,
and the TruthfulQA CSV (``Question``, ``Best Answer``, ``Correct Answers``, ``Incorrect Answers`` with answers
separated by ``; ``), whose triple is the question in a prompt template, the best answer and the first
incorrect answer (the binary form GrAInS uses). Row ranges select a split (``0-199``: rows 0 to 199).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from steering.errors import InvalidRequestError

DEFAULT_QA_TEMPLATE = "Q: {question}\nA:"


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    preferred: str
    dispreferred: str
    image: str | None = None
    """For a vision-language model: the image the prompt shows, as a data URL or a file path (in a JSON Lines
    file: a path relative to the file, a data URL, or bare base64)."""


@dataclass(frozen=True)
class TruthfulQAItem:
    question: str
    best: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    image: str | None = None
    """The image the question shows (a vision-language model): a data URL or a file path."""

    def preference(self, template: str = DEFAULT_QA_TEMPLATE) -> PreferenceExample:
        return PreferenceExample(template.format(question=self.question), self.best, self.incorrect[0], self.image)

    @classmethod
    def from_preference(cls, e: PreferenceExample) -> TruthfulQAItem:
        """A preference example as a two-answer question (binary = MC1): the prompt is the question."""
        return cls(e.prompt, e.preferred, (), (e.dispreferred,), e.image)


def parse_rows(spec: str | None, total: int) -> list[int]:
    """``None``: all rows; ``"a-b"`` (inclusive), ``"a:b"`` (exclusive end) or ``"a,b,c"``."""
    if not spec:
        return list(range(total))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.extend(range(a, b + 1))
            elif ":" in part:
                a, b = (int(x) for x in part.split(":", 1))
                out.extend(range(a, b))
            elif part:
                out.append(int(part))
    except ValueError:
        raise InvalidRequestError(f"bad row range {spec!r}; use e.g. '0-49' or '0:50' or '1,5,9'",
                                     param="rows") from None
    bad = [r for r in out if not 0 <= r < total]
    if bad:
        raise InvalidRequestError(f"rows {bad[:5]} are out of range; the file has {total} rows", param="rows")
    return out


def read_truthfulqa(path: str | os.PathLike) -> list[TruthfulQAItem]:
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"Question", "Best Answer", "Incorrect Answers"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidRequestError(f"{path}: not a TruthfulQA CSV, missing columns {sorted(missing)}",
                                         param="data")
        for n, row in enumerate(reader):
            split = lambda s: tuple(a.strip() for a in (s or "").split(";") if a.strip())  # noqa: E731
            incorrect = split(row["Incorrect Answers"])
            if not row["Question"].strip() or not row["Best Answer"].strip() or not incorrect:
                raise InvalidRequestError(f"{path}: row {n} lacks a question, best answer or incorrect answer",
                                             param="data")
            items.append(TruthfulQAItem(row["Question"].strip(), row["Best Answer"].strip(),
                                        split(row.get("Correct Answers")), incorrect))
    return items


def _image_ref(value: object, folder: Path, where: str) -> str:
    """An example's ``image`` as a data URL or an absolute path: a path relative to the data file, a data URL, or
    bare base64."""
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{where}: image must be a non-empty string (a path, a data URL or base64)",
                                  param="data")
    if value.startswith("data:"):
        return value
    candidate = (folder / value).expanduser()
    if len(value) < 4096 and candidate.is_file():
        return str(candidate.resolve())
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}: image {value[:60]!r} is neither a file next to the data file, a data "
                                  "URL nor base64", param="data") from None
    return f"data:application/octet-stream;base64,{value}"


def read_jsonl(path: str | os.PathLike) -> list[PreferenceExample]:
    out = []
    fields = {"prompt", "preferred", "dispreferred"}
    folder = Path(path).parent
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path}:{n}: not JSON: {exc.msg}", param="data") from None
            if not isinstance(obj, dict) or not fields <= set(obj) <= fields | {"image"}:
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise InvalidRequestError(f"{path}:{n}: each line needs exactly the fields {sorted(fields)} (and "
                                          f"optionally image); got {got}", param="data")
            if not all(isinstance(obj[f], str) and obj[f] for f in fields):
                raise InvalidRequestError(f"{path}:{n}: prompt, preferred and dispreferred must be non-empty "
                                             "strings", param="data")
            image = _image_ref(obj["image"], folder, f"{path}:{n}") if obj.get("image") is not None else None
            out.append(PreferenceExample(obj["prompt"], obj["preferred"], obj["dispreferred"], image))
    return out


def load_examples(path: str | os.PathLike, rows: str | None = None,
                  template: str = DEFAULT_QA_TEMPLATE) -> list[PreferenceExample]:
    """Read a ``.jsonl`` preference file or a TruthfulQA ``.csv``, then keep ``rows``."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"data file not found: {p}", param="data")
    if p.suffix.lower() == ".csv":
        examples = [item.preference(template) for item in read_truthfulqa(p)]
    else:
        examples = read_jsonl(p)
    if not examples:
        raise InvalidRequestError(f"{p}: no examples", param="data")
    return [examples[i] for i in parse_rows(rows, len(examples))]


def dataset_hash(examples: list[PreferenceExample]) -> str:
    """sha256 of the examples' canonical JSON: two builds from the same data carry the same hash (an example
    without an image hashes as it did before images existed)."""
    rows = [{k: v for k, v in asdict(e).items() if not (k == "image" and v is None)} for e in examples]
    blob = json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()

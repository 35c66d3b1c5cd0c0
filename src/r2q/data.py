"""Reading and validating preference / SFT data, rendering chat templates, tokenising.

Rows come from JSONL, JSON, CSV, parquet or a saved `datasets` directory, in TRL's formats:

- preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- preference, conversational: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected``
  lists of messages (usually one assistant message)
- preference, implicit prompt: ``{"chosen": [msgs], "rejected": [msgs]}``; the prompt is the longest run of
  leading messages the two share (whole messages compared; at least one message is left to each completion)
- SFT: ``{"prompt", "completion"}`` (strings or messages), ``{"text": str}``, ``{"messages": [msgs]}``, or
  any preference row (trained on ``chosen``)

Prompt and completion are tokenised separately, so the boundary between them is exact:
``prompt_ids = tok(prompt, add_special_tokens=True)`` and
``completion_ids = tok(completion, add_special_tokens=False) + [EOS]``. Every problem with the input is a
one-line `UserError` naming the file and the line (JSONL, CSV) or row (JSON, parquet, datasets) at fault.

A completion that was cut (say at a sampling length cap) did not end, so learning EOS after it would be wrong.
An optional boolean ``<field>_eos`` per completion field says whether it ended: ``chosen_eos``,
``rejected_eos`` (preference rows), ``completion_eos``, ``text_eos``, ``messages_eos`` (SFT rows; a
preference row used as SFT data reads ``chosen_eos``). Absent or null: true, EOS is appended (unless the
text already ends with it). False: nothing is appended, and an EOS the text itself ends with is kept.
Anything else is a bad row. CSV has no booleans, so there the cells ``true``, ``false``, ``1`` and ``0`` (any
case) are read as booleans and an empty cell as absent.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from .config import check_options, option
from .errors import UserError, first_line
from .progress import progress_bar

MAX_SKIPPED_MESSAGES = 20
EOS_FLAGS = ("chosen_eos", "rejected_eos", "completion_eos", "text_eos", "messages_eos")
_CSV_BOOLS = {"true": True, "1": True, "false": False, "0": False}
FORMATS_HELP = (".jsonl, .json, .parquet, .csv, a directory saved with datasets' save_to_disk, a data set repository "
                "directory, or a hub data set ORG/NAME")


Turns = list[tuple[str, int]]  # the messages of a conversational completion: (role, where it ends in the text)


@dataclass
class PreferenceExample:
    """One tokenised preference pair; `chosen_ids` / `rejected_ids` end with EOS unless truncated or flagged
    as not ended (``chosen_eos`` / ``rejected_eos`` false)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int
    turns: list[Turns] | None = None  # chosen's and rejected's turns, for conversational rows


@dataclass
class SFTExample:
    """One tokenised prompt + completion; `completion_ids` ends with EOS unless truncated or flagged as not
    ended (the row's ``<field>_eos`` false)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    row: int
    turns: list[Turns] | None = None  # the completion's turns, for conversational rows


@dataclass
class DataReport:
    """What loading did to the rows: kept, skipped (first messages kept), truncated, identical pairs."""

    source: str
    kind: str = "preference"
    n_rows: int = 0
    n_kept: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0
    n_identical: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.n_rows} rows", f"{self.n_kept} kept"]
        if self.n_skipped:
            parts.append(f"{self.n_skipped} skipped")
        parts.append(f"{self.n_prompt_truncated} prompts truncated")
        parts.append(f"{self.n_completion_truncated} rows with a truncated completion")
        if self.n_identical:
            parts.append(f"{self.n_identical} with chosen identical to rejected")
        return f"{self.source}: " + ", ".join(parts)

    def notes(self, max_skipped: int = 3) -> list[str]:
        """What a command says about loading (the summary and the first skipped rows), or nothing when every row
        was used whole: skipped, cut or identical rows change what is trained or scored."""
        if not (self.n_skipped or self.n_prompt_truncated or self.n_completion_truncated or self.n_identical):
            return []
        return [self.summary()] + [f"  skipped: {msg}" for msg in self.skipped[:max_skipped]]


class _RowError(Exception):
    """A problem with one row; becomes a UserError naming the row, or a skipped row with skip_bad."""


# ---- reading

def read_rows(path: str | os.PathLike, split: str = "train", subset: str = "") -> list[tuple[int, dict]]:
    """The rows of a data file as ``(number, row)``: 1-based line (JSONL, CSV) or row (others) numbers."""
    source, unit, items = _read(path, split, subset)
    for n, item in items:
        if isinstance(item, _RowError):
            raise UserError(f"{source} {unit} {n}: {item}")
    return items  # type: ignore[return-value]


def _looks_like_hub_id(name: str) -> bool:
    """ORG/NAME as the hub names data sets (not a path: no leading ./ or /, no data file extension, one slash)."""
    parts = name.split("/")
    data_file = Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not data_file


def _read(path: str | os.PathLike, split: str = "train", subset: str = "", split_flag: str = "--split"
          ) -> tuple[str, str, list[tuple[int, dict | _RowError]]]:
    """(source name, "line" or "row", rows); a row that cannot be parsed is carried as its _RowError.
    Directories: a data set saved with save_to_disk, or a data set repository laid out as on the hub (read with
    datasets.load_dataset); a name ORG/NAME that is no local path is a hub data set. `split` and `subset` (the
    configuration) choose within those."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        if _looks_like_hub_id(source):
            unit, items = "row", _read_hub(source, source, split, subset, split_flag=split_flag)
        else:
            raise UserError(f"{source}: no such file or directory")
    elif p.is_dir():
        unit, items = "row", _read_dataset_dir(p, source, split, subset, split_flag)
    else:
        ext = p.suffix.lower()
        readers = {".jsonl": ("line", _read_jsonl), ".json": ("row", _read_json), ".csv": ("line", _read_csv),
                   ".parquet": ("row", _read_parquet)}
        if ext not in readers:
            raise UserError(f"{source}: unknown data format {ext or '(no extension)'!r}; use {FORMATS_HELP}")
        unit, reader = readers[ext]
        items = reader(p, source)
    if not items:
        raise UserError(f"{source}: the file has no rows")
    return source, unit, items


def _bytes(p: Path, source: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise UserError(f"{source}: cannot read the file: {e.strerror or e}") from e


def _not_utf8(e: UnicodeDecodeError, offset: int, line_offset: int | None = None) -> str:
    """Where the bad bytes are: `offset` (0-based) in the file, and in the line if `line_offset` is given."""
    where = f"{offset} of the file" if line_offset is None else f"{line_offset} of the line ({offset} of the file)"
    return f"not UTF-8 text: {e.reason} {e.object[e.start:e.end]!r} at byte offset {where}"


def read_text(path: str | os.PathLike) -> str:
    """A text file (a prompts list, say) as UTF-8 without a leading BOM; a byte that is not UTF-8, or a file that
    cannot be read, is a UserError naming the file and the line."""
    return _text(Path(path), str(path))


def _text(p: Path, source: str) -> str:
    """The file as UTF-8 text without a leading BOM; a byte that is not UTF-8 is a UserError naming its line."""
    data = _bytes(p, source)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{source} line {line}: {_not_utf8(e, e.start)}") from None


def _parse_json(text: str) -> Any:
    """json.loads; nesting too deep is a ValueError too, as malformed JSON (JSONDecodeError) and a huge
    integer are."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_jsonl(p: Path, source: str) -> list[tuple[int, dict | _RowError]]:
    items: list[tuple[int, dict | _RowError]] = []
    offset = 0  # where the line starts in the file, in bytes
    for n, raw in enumerate(_bytes(p, source).split(b"\n"), start=1):
        row = _jsonl_row(raw.removesuffix(b"\r"), offset, first=n == 1)
        offset += len(raw) + 1
        if row is not None:
            items.append((n, row))
    return items


def _jsonl_row(line: bytes, offset: int, first: bool) -> dict | _RowError | None:
    """One JSONL line, without its newline, starting at byte `offset` of the file; None if it is blank."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _RowError(_not_utf8(e, offset + e.start, e.start))
    if first:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        obj = _parse_json(text)
    except json.JSONDecodeError as e:  # the text has no newline, so e.colno is the column in the line
        return _RowError(f"malformed JSON at column {e.colno}: {e.msg}")
    except ValueError as e:
        return _RowError(f"cannot read JSON: {first_line(e)}")
    return obj if isinstance(obj, dict) else _not_object(obj)


def _read_json(p: Path, source: str) -> list[tuple[int, dict | _RowError]]:
    text = _text(p, source)
    if not text.strip():
        return []
    try:
        obj = _parse_json(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except ValueError as e:
        raise UserError(f"{source}: cannot read JSON: {first_line(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f"{source}: expected a list of objects (or {{'data': [...]}}), got {_tname(obj)}")
    return [(n, r if isinstance(r, dict) else _not_object(r)) for n, r in enumerate(obj, start=1)]


def _read_csv(p: Path, source: str) -> list[tuple[int, dict | _RowError]]:
    # The csv module keeps every cell a string (pandas would turn texts such as "NA" or "null" into NaN);
    # a cell missing from a short row is None, which validation reports. strict: a quoted field still open
    # at the end of the file (a cut file) is an error, not a field holding the rest of the file.
    text = _text(p, source)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        items: list[tuple[int, dict | _RowError]] = []
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        start = 2  # line 1 is the header
        try:
            for row in reader:
                row.pop(None, None)  # cells beyond the header
                items.append((start, _csv_flags(row)))
                start = reader.line_num + 1
        except csv.Error as e:
            if str(e) == "unexpected end of data":
                raise UserError(f"{source} line {start}: malformed CSV: a quoted field is not closed before "
                                "the end of the file") from e
            # DictReader.line_num is updated only after a good row; its csv.reader's is the line at fault
            raise UserError(f"{source} line {reader.reader.line_num}: malformed CSV: {e}") from e
        return items
    finally:
        csv.field_size_limit(old_limit)


def _csv_flags(row: dict) -> dict | _RowError:
    """The row with its `<field>_eos` cells as bools (true/false/1/0, any case) and empty ones as None."""
    for key in EOS_FLAGS:
        cell = row.get(key)
        if cell is None:  # no such column, or a short row
            continue
        text = cell.strip().lower()
        if not text:
            row[key] = None
        elif text in _CSV_BOOLS:
            row[key] = _CSV_BOOLS[text]
        else:
            return _RowError(f"field {key!r} must be true, false, 1 or 0, got {cell!r}")
    return row


def _read_parquet(p: Path, source: str) -> list[tuple[int, dict | _RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
        table.validate(full=True)  # damaged data (bad offsets, text that is not UTF-8) fails here, not later
        rows = table.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{source}: cannot read parquet: {first_line(e)}") from e
    return list(enumerate(rows, start=1))


def _read_dataset_dir(p: Path, source: str, split: str = "train", subset: str = "", split_flag: str = "--split"
                      ) -> list[tuple[int, dict | _RowError]]:
    import datasets
    import pyarrow as pa

    if not any((p / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        # a repository of data files, as on the hub
        return _read_hub(str(p), source, split, subset, local=True, split_flag=split_flag)
    if subset:
        raise UserError(f"{source}: a data set saved with save_to_disk has no configurations (--subset {subset})")
    try:
        ds = datasets.load_from_disk(str(p))
    # OSError: not a dataset, or a data file missing or damaged; the rest: damaged state.json or
    # dataset_info.json (bad JSON, or JSON of the wrong shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as e:
        raise UserError(f"{source}: a directory, but not a dataset saved with datasets' save_to_disk "
                        f"({type(e).__name__}: {first_line(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source}: no split {split!r} (splits: {', '.join(ds)}); choose one with {split_flag}")
        ds = ds[split]
    return _dataset_rows(ds, source)


def _dataset_rows(ds, source: str) -> list[tuple[int, dict | _RowError]]:
    import pyarrow as pa

    try:
        ds.data.validate(full=True)  # damaged arrow data can crash the process when read unchecked
        rows = ds.to_list()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{source}: a damaged dataset: {first_line(e)}") from e
    return list(enumerate(rows, start=1))


def _read_hub(name: str, source: str, split: str, subset: str, local: bool = False, split_flag: str = "--split"
              ) -> list[tuple[int, dict | _RowError]]:
    """A data set by hub id, or a local directory laid out as a hub repository, through datasets.load_dataset.
    Data sets that ship a loading script are refused (that would run their code)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except ValueError as e:  # a split or configuration the data set does not have
        which = f"; choose a split with {split_flag}" if "split" in str(e).lower() else ""
        raise UserError(f"{source}: {first_line(e)}{which}") from e
    except (OSError, ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if local:
            raise UserError(f"{source}: a directory, but not a dataset saved with datasets' save_to_disk nor a data "
                            f"set repository of data files ({first_line(e)})") from e
        raise UserError(f"{source}: cannot load this data set ({first_line(e)}); no local path of that name "
                        "exists, and a hub data set needs a network connection or the local cache") from e
    except Exception as e:  # datasets raises many kinds; none of them should become a traceback
        raise UserError(f"{source}: cannot load this data set: {type(e).__name__}: {first_line(e)}") from e
    return _dataset_rows(ds, source)


# ---- validating fields

def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _not_object(x: Any) -> _RowError:
    return _RowError(f"expected a JSON object, got {_tname(x)}")


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _get(row: Mapping, name: str, why: str = "") -> Any:
    if name not in row:
        raise _RowError(f"missing field {name!r}{why}")
    value = row[name]
    if _is_missing(value):
        raise _RowError(f"field {name!r} is {'NaN' if value is not None else 'null'} (a missing value)")
    return value


def _eos_flag(row: Mapping, name: str) -> bool:
    """Whether completion field `name` ended, from the row's optional `<name>_eos` bool (absent or null: true)."""
    key = f"{name}_eos"
    value = row.get(key)
    if _is_missing(value):
        return True
    if not isinstance(value, bool):
        raise _RowError(f"field {key!r} must be true or false, got {_tname(value)}")
    return value


def _messages(value: Any, name: str) -> list[dict] | None:
    """`value` as a validated list of messages, or None if it is a string; anything else is a _RowError."""
    if isinstance(value, str):
        return None
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"field {name!r} must be a string or a list of messages, got {_tname(value)}")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, Mapping):
            raise _RowError(f"field {name!r} message {i} must be an object with 'role' and 'content', "
                            f"got {_tname(m)}")
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise _RowError(f"field {name!r} message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise _RowError(f"field {name!r} message {i} {key!r} must be a string, got {_tname(m[key])}")
        # other keys (name, tool_calls, ...) are kept for the template; nulls are columnar-storage filler
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _check_completion(value: str | list[dict], name: str) -> None:
    if isinstance(value, str):
        empty = not value.strip()
    else:
        empty = not value or not any(m["content"].strip() for m in value)
    if empty:
        raise _RowError(f"field {name!r} is empty or only whitespace")


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    """Leading messages a and b share, leaving at least one message to each."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


# ---- parsing rows

def _parse_preference(row: Mapping) -> tuple[str, str | list[dict], list[str | list[dict]]]:
    """(format, prompt, [chosen, rejected]) with prompt and completions all strings or all message lists."""
    chosen_raw, rejected_raw = _get(row, "chosen"), _get(row, "rejected")
    chosen, rejected = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
    if (chosen is None) != (rejected is None):
        raise _RowError("fields 'chosen' and 'rejected' must both be strings or both lists of messages")
    if chosen is not None and rejected is not None and _is_missing(row.get("prompt")):
        n = _shared_prefix(chosen, rejected)
        if n == 0:
            raise _RowError("no 'prompt', and 'chosen' and 'rejected' share no first message to take it from")
        _check_completion(chosen[n:], "chosen")
        _check_completion(rejected[n:], "rejected")
        return "implicit-prompt", chosen[:n], [chosen[n:], rejected[n:]]
    prompt_raw = _get(row, "prompt", " (needed unless 'chosen' and 'rejected' are lists of messages)")
    prompt = _messages(prompt_raw, "prompt")
    if (prompt is None) != (chosen is None):
        raise _RowError("fields 'prompt', 'chosen' and 'rejected' must all be strings or all message lists")
    _check_completion(chosen_raw if chosen is None else chosen, "chosen")
    _check_completion(rejected_raw if rejected is None else rejected, "rejected")
    if prompt is None:
        return "standard", prompt_raw, [chosen_raw, rejected_raw]
    return "conversational", prompt, [chosen, rejected]  # type: ignore[list-item]


def _parse_sft(row: Mapping) -> tuple[str, str | list[dict] | None, list[str | list[dict]], str]:
    """(format, prompt, [completion], the completion's field name); for "text" rows the prompt is None (the
    text is split on tokens)."""
    if "messages" in row:
        msgs = _messages(_get(row, "messages"), "messages")
        if msgs is None:
            raise _RowError("field 'messages' must be a list of messages, got str")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise _RowError("field 'messages' has no assistant message to learn")
        if last != len(msgs) - 1:
            raise _RowError("field 'messages' has messages after the last assistant message")
        _check_completion(msgs[last:], "messages")
        return "conversational", msgs[:last], [msgs[last:]], "messages"
    if "text" in row:
        text = _get(row, "text")
        if not isinstance(text, str):
            raise _RowError(f"field 'text' must be a string, got {_tname(text)}")
        _check_completion(text, "text")
        return "text", None, [text], "text"
    if "completion" in row:
        comp_raw, prompt_raw = _get(row, "completion"), _get(row, "prompt")
        comp, prompt = _messages(comp_raw, "completion"), _messages(prompt_raw, "prompt")
        if (comp is None) != (prompt is None):
            raise _RowError("fields 'prompt' and 'completion' must both be strings or both lists of messages")
        _check_completion(comp_raw if comp is None else comp, "completion")
        if prompt is None:
            return "standard", prompt_raw, [comp_raw], "completion"
        return "conversational", prompt, [comp], "completion"  # type: ignore[list-item]
    if "chosen" in row:
        fmt, prompt, (chosen, _) = _parse_preference(row)
        return fmt, prompt, [chosen], "chosen"
    raise _RowError("missing fields: need 'prompt' and 'completion', 'messages', 'text', "
                    "or 'prompt', 'chosen' and 'rejected'")


# ---- tokenising

def _render(tokenizer, prompt: list[dict], completions: list[list[dict]], names: Sequence[str]
            ) -> tuple[list[str], list[Turns | None]]:
    """[prompt text, completion texts...] from the chat template, each completion continuing the prompt, and
    each completion's turns: (role, offset in its text where the message ends), or None where the template does
    not render the conversation message by message as prefixes of the whole."""
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        fulls = [tokenizer.apply_chat_template(prompt + c, tokenize=False) for c in completions]
    except (TemplateError, ValueError) as e:  # raised by the template itself, e.g. "roles must alternate"
        raise _RowError(f"the chat template failed: {first_line(e)}") from e
    out, turns = [prompt_text], []
    for full, c, name in zip(fulls, completions, names, strict=True):
        if not full.startswith(prompt_text):
            raise _RowError(f"the chat template's rendering of prompt + {name!r} does not start with its "
                            "rendering of the prompt, so the prompt/completion boundary is unclear")
        out.append(full[len(prompt_text):])
        turns.append(_turns(tokenizer, prompt, c, prompt_text, full))
    return out, turns


def _turns(tokenizer, prompt: list[dict], completion: list[dict], prompt_text: str, full: str) -> Turns | None:
    """Where each message of a completion ends in its rendered text (the template run on every prefix)."""
    if len(completion) < 2:
        return [(m["role"], len(full) - len(prompt_text)) for m in completion]
    ends = []
    try:
        for k in range(1, len(completion)):
            part = tokenizer.apply_chat_template(prompt + completion[:k], tokenize=False)
            if not (part.startswith(prompt_text) and full.startswith(part)):
                return None
            ends.append(len(part) - len(prompt_text))
    except (TemplateError, ValueError):  # e.g. a template that needs the conversation to end with the assistant
        return None
    ends.append(len(full) - len(prompt_text))
    return [(m["role"], e) for m, e in zip(completion, ends)] if ends == sorted(ends) else None


def _tokens(tokenizer, text: str, name: str, special: bool) -> list[int]:
    """The token ids of `text`; half a surrogate pair (a JSON escape such as \\ud83d without its other half)
    is not text the tokenizer takes, so it is a _RowError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _RowError(f"field {name!r} holds {text[e.start]!r}, half of a surrogate pair, which is not "
                        "text (a string cut inside an escaped character?)") from None
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _encode_prompt(tokenizer, text: str) -> list[int]:
    ids = _tokens(tokenizer, text, "prompt", special=True)
    bos = tokenizer.bos_token_id
    # a chat template that writes BOS itself, tokenised with add_special_tokens=True, would give it twice
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(tokenizer.bos_token):
        ids = ids[1:]
    if not ids:
        if bos is None:
            raise _RowError("the prompt is empty and the tokenizer has no BOS token to stand in for it")
        ids = [bos]
    return ids


def _with_eos(ids: list[int], eos_id: int, ended: bool) -> list[int]:
    """ids + [EOS] if the text ended and does not end with EOS already; a text that did not end is left as is."""
    return ids + [eos_id] if ended and (not ids or ids[-1] != eos_id) else ids


def _encode_completion(tokenizer, text: str, name: str, ended: bool = True) -> list[int]:
    ids = _with_eos(_tokens(tokenizer, text, name, special=False), tokenizer.eos_token_id, ended)
    if not ids:
        raise _RowError(f"field {name!r} has no tokens")
    return ids


def _encode_text(tokenizer, text: str, ended: bool = True) -> tuple[list[int], list[int]]:
    """A plain text as (first token, the rest [+ EOS if it ended]): BOS when the tokenizer has one, else the
    first token."""
    ids = _tokens(tokenizer, text, "text", special=True)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if len(ids) < 2:
        raise _RowError("field 'text' is a single token; there is nothing to learn after the first")
    return ids[:1], _with_eos(ids[1:], tokenizer.eos_token_id, ended)


@dataclass(frozen=True)
class CharLimits:
    """The most characters of a prompt (kept from its end) and of a completion (from its start) that can matter
    after truncation to max_prompt_length / max_length tokens: no token is longer than `per_token` characters,
    so `(tokens + 16) * per_token` characters hold every token that survives, with 16 tokens to spare for the
    cut's edge. Text is cut to these before it is tokenised, so memory follows the limits, not the line."""

    prompt: int
    completion: int

    @classmethod
    def of(cls, tokenizer, max_length: int, max_prompt_length: int) -> CharLimits:
        per_token = max(8, max((len(t) for t in tokenizer.get_vocab()), default=8))
        return cls((max_prompt_length + 16) * per_token, (max_length + 16) * per_token)


def _cut(x: Any, limit: int, keep_end: bool) -> Any:
    """A string, or each message's content, cut to `limit` characters (its end kept, or its start)."""
    if isinstance(x, str):
        return x if len(x) <= limit else (x[-limit:] if keep_end else x[:limit])
    if isinstance(x, list):
        return [dict(m, content=_cut(m["content"], limit, keep_end)) if isinstance(m.get("content"), str) else m
                for m in x]
    return x


def _encode_row(row: Any, tokenizer, kind: str, limits: CharLimits | None = None
                ) -> tuple[str, list[int], list[list[int]], list[Turns | None] | None]:
    """(format, prompt ids, [completion ids], each completion's turns or None) of one row, before truncation
    (text beyond `limits` cut first: it could not survive the truncation)."""
    if not isinstance(row, Mapping):
        raise _RowError(f"expected an object with named fields, got {_tname(row)}")
    if kind == "preference":
        fmt, prompt, comps = _parse_preference(row)
        names: Sequence[str] = ("chosen", "rejected")
    else:
        fmt, prompt, comps, name = _parse_sft(row)
        names = (name,)
    if limits is not None:
        prompt = _cut(prompt, limits.prompt, keep_end=True)
        comps = [_cut(c, limits.completion, keep_end=False) for c in comps]
    ended = [_eos_flag(row, n) for n in names]
    if prompt is None:
        p, c = _encode_text(tokenizer, comps[0], ended[0])  # type: ignore[arg-type]
        return fmt, p, [c], None
    turns = None
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the data is conversational (lists of messages) but the tokenizer has no "
                            "chat template")
        (prompt, *comps), turns = _render(tokenizer, prompt, comps, names)  # type: ignore[arg-type]
    completions = [_encode_completion(tokenizer, c, n, e)  # type: ignore[arg-type]
                   for c, n, e in zip(comps, names, ended, strict=True)]
    return fmt, _encode_prompt(tokenizer, prompt), completions, turns  # type: ignore[arg-type]


def _encode_rows(items: Iterable[tuple[int, Any]], tokenizer, kind: str, source: str, unit: str,
                 skip_bad: bool, progress: bool = False, limits: CharLimits | None = None) -> tuple[list, DataReport]:
    """[(row, format, prompt ids, [completion ids], turns)] before truncation, and a report of rows / skips."""
    report = DataReport(source=source, kind=kind)
    encoded = []
    items = list(items)
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task(f"tokenising {Path(source).name}", total=len(items), info="")
        for n, row in items:
            bar.advance(task)
            report.n_rows += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                fmt, prompt, comps, turns = _encode_row(row, tokenizer, kind, limits)
            except _RowError as e:
                msg = f"{source} {unit} {n}: {e}"
                if not skip_bad:
                    raise UserError(msg) from None
                report.n_skipped += 1
                if len(report.skipped) < MAX_SKIPPED_MESSAGES:
                    report.skipped.append(msg)
                continue
            encoded.append((n, fmt, prompt, comps, turns))
            report.formats[fmt] = report.formats.get(fmt, 0) + 1
            if kind == "preference" and comps[0] == comps[1]:
                report.n_identical += 1
    if report.n_rows == 0:
        raise UserError(f"{source}: there are no rows")
    if not encoded:
        raise UserError(f"{source}: all {report.n_rows} rows are bad; the first: {report.skipped[0]}")
    report.n_kept = len(encoded)
    return encoded, report


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_prompt_length < 1 or max_length < 2:
        raise UserError(f"max_length ({max_length}) and max_prompt_length ({max_prompt_length}) "
                        "must be positive")
    if max_prompt_length >= max_length:
        raise UserError(f"max_prompt_length ({max_prompt_length}) must be less than max_length "
                        f"({max_length}), to leave room for the completion")


def _truncate(prompt: list[int], comps: list[list[int]], max_length: int, max_prompt_length: int):
    """Prompt cut from the left (its end kept), then completions from the right to fit max_length.

    Returns (prompt, completions, prompt_cut, any_completion_cut)."""
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    comp_cut = any(len(c) > room for c in comps)
    return prompt, [c[:room] for c in comps], prompt_cut, comp_cut


def _numbered(rows: Iterable[Mapping | tuple[int, Mapping]]) -> list[tuple[int, Any]]:
    return [r if isinstance(r, tuple) else (i, r) for i, r in enumerate(rows, start=1)]


def _examples(encoded, report: DataReport, max_length: int, max_prompt_length: int) -> list:
    out: list = []
    for n, _fmt, prompt, comps, turns in encoded:
        prompt, comps, p_cut, c_cut = _truncate(prompt, comps, max_length, max_prompt_length)
        report.n_prompt_truncated += p_cut
        report.n_completion_truncated += c_cut
        if report.kind == "preference":
            out.append(PreferenceExample(prompt, comps[0], comps[1], n, turns))
        else:
            out.append(SFTExample(prompt, comps[0], n, turns))
    return out


# ---- public API

def preference_examples_from_rows(
    rows: Iterable[Mapping | tuple[int, Mapping]], tokenizer, max_length: int = 1024,
    max_prompt_length: int = 512, skip_bad: bool = False, *, source: str = "<rows>", unit: str = "row",
    progress: bool = False,
) -> tuple[list[PreferenceExample], DataReport]:
    """Tokenised, truncated preference pairs from in-memory rows.

    rows: dicts (numbered 1, 2, ...) or (number, dict) pairs as `read_rows` gives; `source` and `unit`
    ("row" or "line") name them in messages.
    """
    _check_lengths(max_length, max_prompt_length)
    encoded, report = _encode_rows(_numbered(rows), tokenizer, "preference", source, unit, skip_bad, progress,
                                   CharLimits.of(tokenizer, max_length, max_prompt_length))
    return _examples(encoded, report, max_length, max_prompt_length), report


def sft_examples_from_rows(
    rows: Iterable[Mapping | tuple[int, Mapping]], tokenizer, max_length: int = 1024,
    max_prompt_length: int = 512, skip_bad: bool = False, *, source: str = "<rows>", unit: str = "row",
    progress: bool = False,
) -> tuple[list[SFTExample], DataReport]:
    """Tokenised, truncated prompt + completion examples from in-memory rows."""
    _check_lengths(max_length, max_prompt_length)
    encoded, report = _encode_rows(_numbered(rows), tokenizer, "sft", source, unit, skip_bad, progress,
                                   CharLimits.of(tokenizer, max_length, max_prompt_length))
    return _examples(encoded, report, max_length, max_prompt_length), report


def load_preferences(
    path: str | os.PathLike, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    skip_bad: bool = False, progress: bool = False, split: str = "train", subset: str = "",
    split_flag: str = "--split",
) -> tuple[list[PreferenceExample], DataReport]:
    """Preference pairs from a data file (or data set: `split`, `subset`), tokenised and truncated; a bad row is a
    UserError or skipped. `split_flag`: the option that chose the split, named when it is wrong."""
    return _load(preference_examples_from_rows, path, tokenizer, max_length, max_prompt_length, skip_bad, progress,
                 split, subset, split_flag)


def load_sft(
    path: str | os.PathLike, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    skip_bad: bool = False, progress: bool = False, split: str = "train", subset: str = "",
    split_flag: str = "--split",
) -> tuple[list[SFTExample], DataReport]:
    """SFT examples from a data file (or data set: `split`, `subset`), tokenised and truncated; a bad row is a
    UserError or skipped. `split_flag`: the option that chose the split, named when it is wrong."""
    return _load(sft_examples_from_rows, path, tokenizer, max_length, max_prompt_length, skip_bad, progress, split,
                 subset, split_flag)


def _load(from_rows, path, tokenizer, max_length: int, max_prompt_length: int, skip_bad: bool, progress: bool,
          split: str = "train", subset: str = "", split_flag: str = "--split"):
    _check_lengths(max_length, max_prompt_length)  # before reading: a bad option fails without touching the file
    source, unit, items = _read(path, split, subset, split_flag)
    return from_rows(items, tokenizer, max_length, max_prompt_length, skip_bad, source=source, unit=unit,
                     progress=progress)


def _percentiles(xs: list[int]) -> dict[str, int]:
    """Nearest-rank p50 / p90 / p99 / max of token lengths."""
    s = sorted(xs)
    return {f"p{q}": s[max(0, math.ceil(q / 100 * len(s)) - 1)] for q in (50, 90, 99)} | {"max": s[-1]}


@dataclass
class InspectConfig:
    """Options of `r2q inspect-data`; the CLI is generated from these fields."""

    data: str = option("", "Preference or SFT data (.jsonl, .json, .parquet, .csv, dataset dir)", positional=True)
    model: str = option("", "Model (or tokenizer) directory whose tokenizer to use")
    max_length: int = option(1024, "Max tokens of prompt + completion", ge=2)
    max_prompt_length: int = option(512, "Max prompt tokens (cut from the left); less than --max-length", ge=1)

    def __post_init__(self):
        check_options(self)
        if not self.model:
            raise UserError("--model is required (its tokenizer counts the tokens)")


def inspect_data(
    path: str | os.PathLike, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    skip_bad: bool = True, kind: str | None = None,
) -> dict:
    """Counts, format and token-length percentiles (before truncation) of a data file, as plain data.

    kind: "preference" or "sft"; by default preference if the first row has 'chosen' and 'rejected'.
    """
    _check_lengths(max_length, max_prompt_length)
    source, unit, items = _read(path)
    if kind is None:
        first = next((r for _, r in items if isinstance(r, Mapping)), {})
        kind = "preference" if "chosen" in first and "rejected" in first else "sft"
    if kind not in ("preference", "sft"):
        raise UserError(f"unknown data kind {kind!r}; use preference or sft")
    encoded, report = _encode_rows(items, tokenizer, kind, source, unit, skip_bad)
    _examples(encoded, report, max_length, max_prompt_length)  # fills the truncation counts
    names = ("chosen", "rejected") if kind == "preference" else ("completion",)
    lengths = {"prompt": _percentiles([len(p) for _, _, p, _, _ in encoded])}
    for i, name in enumerate(names):
        lengths[name] = _percentiles([len(c[i]) for _, _, _, c, _ in encoded])
    formats = report.formats
    return {
        "source": source,
        "kind": kind,
        "format": next(iter(formats)) if len(formats) == 1 else "mixed",
        "formats": dict(formats),
        "rows": report.n_rows,
        "kept": report.n_kept,
        "skipped": report.n_skipped,
        "prompt_truncated": report.n_prompt_truncated,
        "completion_truncated": report.n_completion_truncated,
        "identical": report.n_identical,
        "lengths": lengths,
        "skipped_rows": list(report.skipped),
    }

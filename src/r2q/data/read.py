"""Reading data: files (JSONL, JSON, CSV, parquet), saved `datasets` directories, data set repositories and hub
data sets, as numbered raw rows ``(number, dict)``.

Numbers are 1-based lines (JSONL, CSV) or rows (JSON, parquet, datasets), so that every problem can be a one-line
`UserError` naming the file and the line or row at fault. A row that cannot be parsed is carried as a `_RowError`
in its place (by `_read`) for the caller to raise or, with skip_bad, to count and skip.

CSV has no booleans, so there the ``<field>_eos`` cells ``true``, ``false``, ``1`` and ``0`` (any case) are read as
booleans and an empty cell as absent (see r2q.data.rows for what the flags mean).
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line

EOS_FLAGS = ("chosen_eos", "rejected_eos", "completion_eos", "text_eos", "messages_eos")
_CSV_BOOLS = {"true": True, "1": True, "false": False, "0": False}
FORMATS_HELP = (".jsonl, .json, .parquet, .csv, a directory saved with datasets' save_to_disk, a data set repository "
                "directory, or a hub data set ORG/NAME")


class _RowError(Exception):
    """A problem with one row; becomes a UserError naming the row, or a skipped row with skip_bad."""


def read_rows(path: str | os.PathLike, split: str = "train", subset: str = "") -> list[tuple[int, dict]]:
    """The rows of a data file as ``(number, row)``: 1-based line (JSONL, CSV) or row (others) numbers."""
    source, unit, items = _read(path, split, subset)
    for n, item in items:
        if isinstance(item, _RowError):
            raise UserError(f"{source} {unit} {n}: {item}")
    return items  # type: ignore[return-value]


def check_choices(given: dict[str, str | os.PathLike]) -> None:
    """--split and --subset choose within a data set (a directory or a hub data set); a data file has neither, and
    all its rows are read, so a choice given for one would be ignored. given: flag -> the data it chooses in."""
    for flag, path in given.items():
        if path and Path(path).is_file():
            raise UserError(f"{flag} chooses within a data set (a directory or a hub data set), but {path} is a data "
                            "file, whose rows are all read: drop it")


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
                extra = row.pop(None, None) or []  # cells beyond the header: a shifted row unless all empty
                filled = [c for c in extra if c.strip()]
                items.append((start, _csv_flags(row) if not filled else _RowError(
                    f"{len(row) + len(extra)} cells but the header names {len(row)} columns (an unquoted comma "
                    f"in a text? quote the cells that hold commas); the first extra cell is {filled[0][:40]!r}")))
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
        with _datasets_quiet(datasets):
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
        cause = e.__cause__ or e.__context__  # (DatasetGenerationError says only that generating failed)
        why = f"{type(e).__name__}: {first_line(e)}" + (f" ({type(cause).__name__}: {first_line(cause)})"
                                                         if cause is not None else "")
        raise UserError(f"{source}: cannot load this data set: {why}") from e
    return _dataset_rows(ds, source)


@contextmanager
def _datasets_quiet(datasets):
    """datasets' progress bars and logs below errors off while it loads (r2q says what it loaded), then as they were."""
    log = datasets.utils.logging
    bars, level = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _not_object(x: Any) -> _RowError:
    return _RowError(f"expected a JSON object, got {_tname(x)}")

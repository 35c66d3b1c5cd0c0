"""Encoding validated rows to token ids: tokenising, EOS, truncation, and the loaders that go from rows or a
data file to `PreferenceExample` / `SFTExample` lists with a `DataReport` of what was kept, skipped and cut,
and `inspect_data`, the same steps' counts and token-length percentiles as plain data (`r2q inspect-data`).

Prompt and completion are tokenised separately, so the boundary between them is exact:
``prompt_ids = tok(prompt, add_special_tokens=True)`` and
``completion_ids = tok(completion, add_special_tokens=False) + [EOS]`` (EOS unless the row says the completion
did not end; see r2q.data.rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, check_count
from ..progress import progress_bar
from .read import _read, _RowError, _tname
from .rows import Turns, _eos_flag, _parse_preference, _parse_sft, _render, render_prompt

MAX_SKIPPED_MESSAGES = 20


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
    n_identical_after_cut: int = 0  # pairs whose completions differ only past where they were cut
    n_empty_completions: int = 0  # empty replies, trained as EOS alone
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.n_rows} rows", f"{self.n_kept} kept"]
        if self.n_skipped:
            parts.append(f"{self.n_skipped} skipped")
        parts.append(f"{self.n_prompt_truncated} prompts truncated")
        parts.append(f"{self.n_completion_truncated} rows with a truncated completion")
        if self.n_identical:
            parts.append(f"{self.n_identical} with chosen identical to rejected")
        if self.n_identical_after_cut:
            parts.append(f"{self.n_identical_after_cut} made identical by the cut (they differ only past --max-length)")
        if self.n_empty_completions:
            parts.append(f"{self.n_empty_completions} empty completions (EOS alone)")
        if self.formats.get("implicit-prompt"):
            parts.append(f"{self.formats['implicit-prompt']} prompts taken from the shared start of chosen and "
                         "rejected")
        return f"{self.source}: " + ", ".join(parts)

    def notes(self, max_skipped: int = 3) -> list[str]:
        """What a command says about loading (the summary and the first skipped rows), or nothing when every row
        was used whole: skipped, cut or identical rows change what is trained or scored."""
        if not (self.n_skipped or self.n_prompt_truncated or self.n_completion_truncated or self.n_identical
                or self.n_identical_after_cut or self.n_empty_completions):
            return []
        return [self.summary()] + [f"  skipped: {msg}" for msg in self.skipped[:max_skipped]]


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


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids as training encodes a prompt, so that decoding starts where a trained completion
    starts: a list of chat messages is rendered with the chat template and its generation prompt; an empty prompt
    is BOS alone. A bad prompt is a UserError."""
    try:
        return _encode_prompt(tokenizer, render_prompt(tokenizer, prompt))
    except _RowError as e:
        raise UserError(str(e)) from None


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
            report.n_empty_completions += sum(c in ([], [tokenizer.eos_token_id]) for c in comps)
    if report.n_rows == 0:
        raise UserError(f"{source}: there are no rows")
    if not encoded:
        raise UserError(f"{source}: all {report.n_rows} rows are bad; the first: {report.skipped[0]}")
    report.n_kept = len(encoded)
    return encoded, report


def check_fit(examples: Sequence[PreferenceExample | SFTExample], limit: int | None) -> None:
    """Every example within the `limit` positions a model embeds (r2q.models.position_limit; None: no limit): its
    prompt and longer completion, the longest sequence a model reads of it (a shared or packed row restarts positions
    per sequence). One line naming the longest, before any compute, instead of an IndexError in the forward."""
    if limit is None:
        return
    over = [(n, e.row) for n, e in zip(_sequence_lengths(examples), examples) if n > limit]
    if over:
        n, row = max(over)
        raise UserError(f"{len(over)} of {len(examples)} examples are longer than the {limit} positions the model "
                        f"embeds (a learned position table); the longest, row {row}, is {n} tokens: pass "
                        f"--max-length {limit} (and a --max-prompt-length below it) to cut them")


def _sequence_lengths(examples: Sequence[PreferenceExample | SFTExample]) -> list[int]:
    """Each example's longest sequence: its prompt and its longer completion."""
    return [len(e.prompt_ids) + max(map(len, _completions(e))) for e in examples]


def _completions(e: PreferenceExample | SFTExample) -> tuple[list[int], ...]:
    return (e.chosen_ids, e.rejected_ids) if isinstance(e, PreferenceExample) else (e.completion_ids,)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    for name, v in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        check_count(v, name)
    if max_length < 2:  # (both are positive integers by now)
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
    for n, _fmt, prompt, orig, turns in encoded:
        prompt, comps, p_cut, c_cut = _truncate(prompt, orig, max_length, max_prompt_length)
        report.n_prompt_truncated += p_cut
        report.n_completion_truncated += c_cut
        if report.kind == "preference":
            # cut to the same tokens: no signal left (the loss is ln 2 whatever the model); said, as identical rows are
            report.n_identical_after_cut += c_cut and comps[0] == comps[1] and orig[0] != orig[1]
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


def inspect_data(
    path: str | os.PathLike, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    skip_bad: bool = True, kind: str | None = None, position_limit: int | None = None,
) -> dict:
    """Counts, format and token-length percentiles (before truncation) of a data file, as plain data.

    kind: "preference" or "sft"; by default preference if the first row has 'chosen' and 'rejected'.
    position_limit: the positions a model embeds (r2q.models.position_limit); the examples longer than it after the
    cut, which training that model would refuse, are counted as "over_position_limit" (None: not counted).
    """
    _check_lengths(max_length, max_prompt_length)
    source, unit, items = _read(path)
    if kind is None:
        first = next((r for _, r in items if isinstance(r, Mapping)), {})
        kind = "preference" if "chosen" in first and "rejected" in first else "sft"
    if kind not in ("preference", "sft"):
        raise UserError(f"unknown data kind {kind!r}; use preference or sft")
    encoded, report = _encode_rows(items, tokenizer, kind, source, unit, skip_bad)
    examples = _examples(encoded, report, max_length, max_prompt_length)  # (fills the truncation counts)
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
        "identical_after_cut": report.n_identical_after_cut,
        "lengths": lengths,
        "longest": max(_sequence_lengths(examples), default=0),
        "over_position_limit": None if position_limit is None else
        sum(n > position_limit for n in _sequence_lengths(examples)),
        "skipped_rows": list(report.skipped),
    }

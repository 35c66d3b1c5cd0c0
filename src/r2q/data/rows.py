"""Validating rows into prompt and completions, in TRL's formats, and rendering conversations with the
tokenizer's chat template.

- preference, standard: ``{"prompt": str, "chosen": str, "rejected": str}``
- preference, conversational: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected``
  lists of messages (usually one assistant message)
- preference, implicit prompt: ``{"chosen": [msgs], "rejected": [msgs]}``; the prompt is the longest run of
  leading messages the two share (whole messages compared; at least one message is left to each completion).
  Strings without a prompt (HH-RLHF's ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``) are
  cut where TRL cuts them (`implicit_prompt`)
- an empty completion (``""``) is a completion of EOS alone, as TRL trains it; the data report counts them
- SFT: ``{"prompt", "completion"}`` (strings or messages), ``{"text": str}``, ``{"messages": [msgs]}``, or
  any preference row (trained on ``chosen``)

A completion that was cut (say at a sampling length cap) did not end, so learning EOS after it would be wrong.
An optional boolean ``<field>_eos`` per completion field says whether it ended: ``chosen_eos``,
``rejected_eos`` (preference rows), ``completion_eos``, ``text_eos``, ``messages_eos`` (SFT rows; a
preference row used as SFT data reads ``chosen_eos``). Absent or null: true, EOS is appended (unless the
text already ends with it). False: nothing is appended, and an EOS the text itself ends with is kept.
Anything else is a bad row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from ..errors import first_line
from .read import _RowError, _tname

Turns = list[tuple[str, int]]  # the messages of a conversational completion: (role, where it ends in the text)


# ---- validating fields

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
    """A completion may be empty text (it is then EOS alone, as TRL trains it), but not an empty list of messages:
    that is no reply at all."""
    if not isinstance(value, str) and not value:
        raise _RowError(f"field {name!r} has no messages")


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a row whose prompt is inside both completions (TRL's standard implicit-prompt
    format, e.g. HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..."), cut where TRL's `extract_prompt` cuts it: at the
    first character where the two differ, one earlier when that character follows a space (so the completions
    keep their leading space); when one string is a prefix of the other, one character before the shorter ends."""
    n = min(len(chosen), len(rejected))
    cut = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if cut == 0 or n == 0:
        raise _RowError("no 'prompt' (missing, null or NaN), and 'chosen' and 'rejected' share no leading text to "
                        "take it from")
    if cut is None:
        cut = n - 1
    elif chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


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
    if chosen is None and _is_missing(row.get("prompt")):
        if not isinstance(chosen_raw, str) or not isinstance(rejected_raw, str):
            raise _RowError("fields 'chosen' and 'rejected' must be strings or lists of messages")
        prompt, *comps = implicit_prompt(chosen_raw, rejected_raw)
        return "implicit-prompt", prompt, comps
    if chosen is not None and rejected is not None and _is_missing(row.get("prompt")):
        n = _shared_prefix(chosen, rejected)
        if n == 0:
            raise _RowError("no 'prompt', and 'chosen' and 'rejected' share no first message to take it from")
        _check_completion(chosen[n:], "chosen")
        _check_completion(rejected[n:], "rejected")
        return "implicit-prompt", chosen[:n], [chosen[n:], rejected[n:]]
    prompt_raw = _get(row, "prompt")
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
        if not text.strip():
            raise _RowError("field 'text' is empty or only whitespace: a text row has nothing else to learn")
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


# ---- rendering conversations

def render_prompt(tokenizer, prompt: Any) -> str:
    """A prompt to decode from as text: a string as it is, a list of messages through the tokenizer's chat
    template with its generation prompt (the assistant's turn opened), as training renders a conversation's
    prompt. A bad message list or a failing template is a _RowError."""
    msgs = _messages(prompt, "prompt")
    if msgs is None:
        return prompt
    if not msgs:
        raise _RowError("field 'prompt' has no messages")
    if not getattr(tokenizer, "chat_template", None):
        raise _RowError("the prompt is a list of messages but the tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as e:
        raise _RowError(f"the chat template failed: {first_line(e)}") from e


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

"""Data loading: every file format gives the same examples, the prompt/completion boundary is exact,
truncation keeps the right ends, and every bad input is a one-line UserError naming the file and line."""

import codecs
import copy
import csv
import json
import random

import pytest

from r2q.data import (
    inspect_data,
    load_preferences,
    load_sft,
    preference_examples_from_rows,
    read_rows,
    sft_examples_from_rows,
)
from r2q.errors import UserError

ROWS = [
    {"prompt": "the movie was", "chosen": " great fun.", "rejected": " boring."},
    {"prompt": "12+30=", "chosen": "42", "rejected": "41"},
    {"prompt": "", "chosen": "a good story.", "rejected": "bad acting."},
]
USER = {"role": "user", "content": "the plot"}
GOOD = {"role": "assistant", "content": "was great."}
BAD = {"role": "assistant", "content": "was dull."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write(path, rows):
    """rows in the format the extension (or a directory name ending in _ds) names."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def ids(ex):
    return (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)


def render(tokenizer, msgs, gen=False):
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


# ---- file formats


@pytest.mark.parametrize("name", ["d.json", "d.csv", "d.parquet", "d_ds"])
def test_every_format_gives_the_jsonl_examples(tmp_path, tokenizer, name):
    ref, _ = load_preferences(write(tmp_path / "d.jsonl", ROWS), tokenizer)
    got, report = load_preferences(write(tmp_path / name, ROWS), tokenizer)
    assert [ids(e) for e in got] == [ids(e) for e in ref]
    assert report.n_rows == report.n_kept == len(ROWS)


@pytest.mark.parametrize("name", ["d.json", "d.parquet", "d_ds"])
def test_conversational_rows_survive_every_nested_format(tmp_path, tokenizer, name):
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
            {"chosen": [USER, GOOD], "rejected": [USER, BAD]}]
    ref, _ = load_preferences(write(tmp_path / "d.jsonl", rows), tokenizer)
    got, _ = load_preferences(write(tmp_path / name, rows), tokenizer)
    assert [ids(e) for e in got] == [ids(e) for e in ref]


def test_row_numbers_name_lines_and_rows(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [n for n, _ in read_rows(path)] == [1, 3]
    assert [e.row for e in load_preferences(path, tokenizer)[0]] == [1, 3]
    assert [e.row for e in load_preferences(write(tmp_path / "d.csv", ROWS), tokenizer)[0]] == [2, 3, 4]
    assert [e.row for e in load_preferences(write(tmp_path / "d.parquet", ROWS), tokenizer)[0]] == [1, 2, 3]


def test_json_data_key_and_dataset_dict_train_split(tmp_path, tokenizer):
    import datasets

    ref, _ = load_preferences(write(tmp_path / "d.jsonl", ROWS), tokenizer)
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS}))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    for path in (tmp_path / "w.json", tmp_path / "dd"):
        assert [ids(e) for e in load_preferences(path, tokenizer)[0]] == [ids(e) for e in ref]


# ---- standard / conversational / implicit prompt, boundaries


def test_boundary_is_exact_and_completions_end_with_one_eos(tokenizer):
    rows = ROWS + [{"prompt": "1+1=", "chosen": "2<|endoftext|>", "rejected": "3"}]
    examples, _ = preference_examples_from_rows(rows, tokenizer)
    eos = tokenizer.eos_token_id
    for ex, row in zip(examples, rows, strict=True):
        assert ex.prompt_ids == (tokenizer(row["prompt"]).input_ids or [tokenizer.bos_token_id])
        for comp, text in ((ex.chosen_ids, row["chosen"]), (ex.rejected_ids, row["rejected"])):
            text = text.removesuffix("<|endoftext|>")
            assert comp[-1] == eos and comp[-2] != eos
            assert comp == tokenizer(text, add_special_tokens=False).input_ids + [eos]
            if row["prompt"]:
                assert tokenizer.decode(ex.prompt_ids + comp[:-1]) == row["prompt"] + text
    assert examples[2].prompt_ids == [tokenizer.bos_token_id]  # empty prompt -> BOS


def test_conversational_splits_the_rendered_chat_at_the_generation_prompt(tokenizer):
    (ex,), report = preference_examples_from_rows([{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}],
                                                  tokenizer)
    prompt_text = render(tokenizer, [USER], gen=True)
    assert ex.prompt_ids == tokenizer(prompt_text).input_ids
    assert tokenizer.decode(ex.prompt_ids + ex.chosen_ids[:-1]) == render(tokenizer, [USER, GOOD])
    assert tokenizer.decode(ex.prompt_ids + ex.rejected_ids[:-1]) == render(tokenizer, [USER, BAD])
    assert report.formats == {"conversational": 1}
    # the same text in the standard format gives the same tokens
    standard = {"prompt": prompt_text, "chosen": render(tokenizer, [USER, GOOD])[len(prompt_text):],
                "rejected": render(tokenizer, [USER, BAD])[len(prompt_text):]}
    assert ids(preference_examples_from_rows([standard], tokenizer)[0][0]) == ids(ex)


def test_implicit_prompt_is_the_longest_shared_message_prefix(tokenizer):
    turns = [USER, {"role": "assistant", "content": "ok."}, {"role": "user", "content": "and the acting"}]
    explicit = {"prompt": turns, "chosen": [GOOD], "rejected": [BAD]}
    implicit = {"chosen": turns + [GOOD], "rejected": turns + [BAD]}
    (a, b), report = preference_examples_from_rows([explicit, implicit], tokenizer)
    assert ids(a) == ids(b)
    assert report.formats == {"conversational": 1, "implicit-prompt": 1}


def test_identical_pairs_are_kept_and_counted(tokenizer):
    rows = [ROWS[0], {"prompt": "p", "chosen": "same.", "rejected": "same."},
            {"chosen": [USER, GOOD], "rejected": [USER, GOOD]}]
    examples, report = preference_examples_from_rows(rows, tokenizer)
    assert len(examples) == 3 and report.n_identical == 2
    assert examples[2].prompt_ids == tokenizer(render(tokenizer, [USER], gen=True)).input_ids


def test_a_tokenizer_that_adds_bos_gets_exactly_one(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token_id
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                              special_tokens=[(tok.bos_token, bos)])
    tok.chat_template = "{{ bos_token }}" + tokenizer.chat_template  # a template that writes BOS itself
    conv = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    (std, conv_ex), _ = preference_examples_from_rows([ROWS[0], conv], tok)
    plain, _ = preference_examples_from_rows([ROWS[0], conv], tokenizer)
    assert std.prompt_ids == [bos] + plain[0].prompt_ids and std.chosen_ids == plain[0].chosen_ids
    assert conv_ex.prompt_ids == [bos] + plain[1].prompt_ids and conv_ex.chosen_ids == plain[1].chosen_ids
    (text,), _ = sft_examples_from_rows([{"text": "the movie."}], tok)
    assert text.prompt_ids == [bos] and bos not in text.completion_ids[:-1]


# ---- truncation


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    long_prompt = "the movie was really very good and the plot was not boring at all but the ending"
    long_comp = " was the best scene of the film and the music was great too."
    rows = [{"prompt": long_prompt, "chosen": long_comp, "rejected": " bad."}, ROWS[1]]
    full, _ = preference_examples_from_rows(rows, tokenizer, max_length=10_000, max_prompt_length=5_000)
    (a, b), report = preference_examples_from_rows(rows, tokenizer, max_length=12, max_prompt_length=8)
    assert len(full[0].prompt_ids) > 8 and len(full[0].chosen_ids) > 4
    assert a.prompt_ids == full[0].prompt_ids[-8:]
    assert a.chosen_ids == full[0].chosen_ids[:4] and a.rejected_ids == full[0].rejected_ids
    assert ids(b) == ids(full[1])
    assert (report.n_prompt_truncated, report.n_completion_truncated) == (1, 1)
    assert "1 prompts truncated" in report.summary()


def test_max_prompt_length_must_leave_room(tokenizer):
    with pytest.raises(UserError, match="max_prompt_length .* must be less than max_length"):
        preference_examples_from_rows(ROWS, tokenizer, max_length=8, max_prompt_length=8)


# ---- bad rows

OK = json.dumps(ROWS[0])
BAD_LINES = [
    ('{"prompt": "a", "chosen": "b",', "malformed JSON at column"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"chosen": "b", "rejected": "c"}', "share no leading text"),  # an implicit prompt needs a shared start
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}',
     "field 'chosen' must be a string or a list of messages, got int"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": [], '
     '"rejected": [{"role": "assistant", "content": "y"}]}', "field 'chosen' has no messages"),
    ('{"prompt": "a", "chosen": null, "rejected": "c"}', "field 'chosen' is null"),
    ('{"prompt": "a", "chosen": NaN, "rejected": "c"}', "field 'chosen' is NaN"),
    ('{"prompt": [{"content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}], '
     '"rejected": [{"role": "assistant", "content": "y"}]}', "field 'prompt' message 1 has no 'role'"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant"}], '
     '"rejected": [{"role": "assistant", "content": "y"}]}', "field 'chosen' message 1 has no 'content'"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], '
     '"rejected": [{"role": "assistant", "content": "y"}]}', "must all be strings or all message lists"),
    ('{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}',
     "share no first message"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "rejected_eos": "false"}',
     "field 'rejected_eos' must be true or false, got str"),
    ('{"prompt": "a", "chosen": "b\\ud83d", "rejected": "c"}', "field 'chosen' holds '\\ud83d', half of a surrogate"),
    ("[" * 100_000, "cannot read JSON: nested too deeply"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_a_bad_row_names_file_line_and_problem(tmp_path, tokenizer, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [OK, line, OK])
    with pytest.raises(UserError) as e:
        load_preferences(path, tokenizer)
    msg = str(e.value)
    assert msg.startswith(f"{path} line 2: ") and problem in msg and "\n" not in msg
    examples, report = load_preferences(path, tokenizer, skip_bad=True)
    assert [ex.row for ex in examples] == [1, 3]
    assert (report.n_rows, report.n_kept, report.n_skipped, report.skipped) == (3, 2, 1, [msg])
    assert "1 skipped" in report.summary()


def test_all_bad_rows_is_an_error_even_when_skipping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES])
    with pytest.raises(UserError, match=f"all {len(BAD_LINES)} rows are bad; the first: .*line 1: malformed"):
        load_preferences(path, tokenizer, skip_bad=True)


def test_extra_cells_in_a_csv_row_are_a_bad_row_not_a_shift(tmp_path, tokenizer):
    path = tmp_path / "extra.csv"
    # row 3's prompt holds an unquoted comma: its cells would shift one column to the right
    path.write_text('prompt,chosen,rejected\na,b,c\nhi, there,good,bad\nx,y,z,,\n')
    with pytest.raises(UserError, match=r"extra\.csv line 3: 4 cells but the header names 3 columns .*'bad'"):
        load_preferences(path, tokenizer)
    examples, report = load_preferences(path, tokenizer, skip_bad=True)
    assert [e.row for e in examples] == [2, 4] and report.n_skipped == 1  # empty cells past the header are fine
    path.write_text('prompt,chosen,rejected\n"hi, there",good,bad\n')
    assert len(load_preferences(path, tokenizer)[0]) == 1


def test_missing_cells_in_csv_and_parquet_name_the_row(tmp_path, tokenizer):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,chosen,rejected\na,b,c\n"two\nlines",b\n')
    with pytest.raises(UserError, match=r"bad\.csv line 3: field 'rejected' is null"):
        load_preferences(path, tokenizer)
    # a cell holding the text "NA" is text, not a missing value
    path.write_text("prompt,chosen,rejected\nNA,null,None\n")
    assert len(load_preferences(path, tokenizer)[0]) == 1
    rows = [ROWS[0], {**ROWS[1], "chosen": None}]
    with pytest.raises(UserError, match=r"bad\.parquet row 2: field 'chosen' is null"):
        load_preferences(write(tmp_path / "bad.parquet", rows), tokenizer)
    with pytest.raises(UserError, match=r"bad_ds row 2: field 'chosen' is null"):
        load_preferences(write(tmp_path / "bad_ds", rows), tokenizer)


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("missing.jsonl", None, "no such file or directory"),
    ("d.txt", "x", "unknown data format '.txt'"),
    ("d.jsonl", "\n\n", "the file has no rows"),
    ("d.json", "[]", "the file has no rows"),
    ("d.csv", "", "the file has no rows"),
    ("d.json", '[{"a": 1},\n {"b": }]', "malformed JSON at line 2 column"),
    ("d.json", '{"prompt": "a"}', "expected a list of objects"),
    ("d.parquet", "not parquet", "cannot read parquet"),
    ("notds", "", "not a dataset saved with datasets' save_to_disk"),
])
def test_bad_files_name_the_file_and_problem(tmp_path, tokenizer, name, content, problem):
    path = tmp_path / name
    if name == "notds":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        load_preferences(path, tokenizer, skip_bad=True)
    assert str(e.value).startswith(str(path)) and problem in str(e.value) and "\n" not in str(e.value)


def test_dataset_dict_without_train_split(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="no split 'train' .*test.*--split"):
        load_preferences(tmp_path / "dd", tokenizer)


# ---- damaged files: one line naming the file (and the line), never a traceback

RANDOM = random.Random(0).randbytes(4000)  # not UTF-8 from its first byte


def bad_byte(data):
    """data with a byte that is not UTF-8 in ROWS[1] ("12+30=")."""
    return data.replace(b"12+30=", b"12\xff30=")


DAMAGED = [
    pytest.param("d.jsonl", lambda b: b[:-20], "line 3: malformed JSON at column", id="jsonl-cut"),
    pytest.param("d.jsonl", bad_byte, "line 2: not UTF-8 text", id="jsonl-not-utf8"),
    pytest.param("d.jsonl", lambda b: RANDOM, "line 1: not UTF-8 text", id="jsonl-random"),
    pytest.param("d.jsonl", lambda b: b"", "the file has no rows", id="jsonl-empty"),
    pytest.param("d.jsonl", lambda b: b" \n\t\r\n", "the file has no rows", id="jsonl-blank"),
    pytest.param("d.json", lambda b: b[:len(b) // 2], "malformed JSON at line 1 column", id="json-cut"),
    pytest.param("d.json", bad_byte, "line 1: not UTF-8 text", id="json-not-utf8"),
    pytest.param("d.json", lambda b: RANDOM, "line 1: not UTF-8 text", id="json-random"),
    pytest.param("d.json", lambda b: b"", "the file has no rows", id="json-empty"),
    pytest.param("d.json", lambda b: b" \n ", "the file has no rows", id="json-blank"),
    pytest.param("d.csv", lambda b: b + b'"cut in a, quoted field\n',
                 "line 5: malformed CSV: a quoted field is not closed", id="csv-cut-in-quotes"),
    pytest.param("d.csv", lambda b: b + b'"a"b,c\n', "line 5: malformed CSV", id="csv-text-after-quotes"),
    pytest.param("d.csv", bad_byte, "line 3: not UTF-8 text", id="csv-not-utf8"),
    pytest.param("d.csv", lambda b: RANDOM, "line 1: not UTF-8 text", id="csv-random"),
    pytest.param("d.csv", lambda b: b"", "the file has no rows", id="csv-empty"),
    pytest.param("d.parquet", lambda b: b[:len(b) // 2], "cannot read parquet", id="parquet-cut"),
    pytest.param("d.parquet", lambda b: RANDOM, "cannot read parquet", id="parquet-random"),
    pytest.param("d.parquet", lambda b: b"", "cannot read parquet", id="parquet-empty"),
    pytest.param("d.parquet", lambda b: b.replace(b"great fun", b"great\xfffun"), "cannot read parquet",
                 id="parquet-not-utf8"),
    pytest.param("d_ds", lambda b: b[:len(b) // 2], "not a dataset saved with", id="dataset-cut"),
    pytest.param("d_ds", lambda b: RANDOM, "not a dataset saved with", id="dataset-random"),
    pytest.param("d_ds", lambda b: b.replace(b"great fun", b"great\xfffun"), "a damaged dataset: ",
                 id="dataset-not-utf8"),
]


def damaged(path, damage):
    """path written with ROWS in its format, then damage(its bytes) written over it (over the data file of a
    saved dataset)."""
    write(path, ROWS)
    target = next(path.glob("*.arrow")) if path.is_dir() else path
    data = target.read_bytes()
    target.write_bytes(damage(data))
    assert target.read_bytes() != data
    return path


@pytest.mark.parametrize(("name", "damage", "problem"), DAMAGED)
def test_a_damaged_file_is_a_one_line_user_error(tmp_path, tokenizer, name, damage, problem):
    path = damaged(tmp_path / name, damage)
    for load in (read_rows, lambda p: load_preferences(p, tokenizer), lambda p: load_sft(p, tokenizer),
                 lambda p: inspect_data(p, tokenizer, skip_bad=False)):
        with pytest.raises(UserError) as e:  # any other exception fails the test
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}") and problem in msg and "\n" not in msg


@pytest.mark.parametrize(("name", "content"), [
    ("state.json", b"{}"), ("state.json", b"[1]"), ("state.json", RANDOM), ("dataset_info.json", b"[1]"),
    ("dataset_info.json", b"{"),
])
def test_damaged_dataset_metadata_is_a_one_line_user_error(tmp_path, name, content):
    path = write(tmp_path / "d_ds", ROWS)
    (path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        read_rows(path)
    assert str(e.value).startswith(f"{path}: a directory, but not a dataset saved with") and "\n" not in str(e.value)


def test_skip_bad_skips_a_line_that_is_not_utf8(tmp_path, tokenizer):
    bad = OK.encode().replace(b"movie", b"mov\xe9e")
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([OK.encode(), bad, OK.encode()]) + b"\n")
    at = bad.index(b"\xe9")
    msg = (f"{path} line 2: not UTF-8 text: invalid continuation byte b'\\xe9' at byte offset {at} of the line "
           f"({len(OK) + 1 + at} of the file)")
    with pytest.raises(UserError) as e:
        load_preferences(path, tokenizer)
    assert str(e.value) == msg
    examples, report = load_preferences(path, tokenizer, skip_bad=True)
    assert [ex.row for ex in examples] == [1, 3]
    assert (report.n_rows, report.n_kept, report.n_skipped, report.skipped) == (3, 2, 1, [msg])


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".json"])
def test_a_bad_byte_far_into_a_file_names_its_line_and_offset(tmp_path, ext):
    path = write(tmp_path / f"big{ext}", ROWS * 3000)
    data = path.read_bytes()
    at = data.index(b"12+30=", 170_000) + 2  # past a text reader's buffer, where offsets used to go wrong
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    line = data.count(b"\n", 0, at) + 1
    line_start = data.rfind(b"\n", 0, at) + 1
    where = f"{at - line_start} of the line ({at} of the file)" if ext == ".jsonl" else f"{at} of the file"
    with pytest.raises(UserError) as e:
        read_rows(path)
    assert str(e.value) == f"{path} line {line}: not UTF-8 text: invalid start byte b'\\xff' at byte offset {where}"
    assert ext == ".json" or line > 1000


def test_malformed_json_column_is_the_column_in_the_line(tmp_path, tokenizer):
    # the column json.loads gives for the line alone: not counted past the newline (a cut line used to be
    # "column 1"), nor shifted by a BOM or CRLF
    bad = ['{"prompt": "a", "chosen":', '{"prompt": "a"} {"chosen": "b"}', '  {"prompt" "a"}', "[1, 2,"]
    path = tmp_path / "d.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(bad).encode() + b"\n" + OK.encode())
    _, report = load_preferences(path, tokenizer, skip_bad=True)
    for n, line in enumerate(bad, start=1):
        with pytest.raises(json.JSONDecodeError) as e:
            json.loads(line)
        assert report.skipped[n - 1] == f"{path} line {n}: malformed JSON at column {e.value.colno}: {e.value.msg}"
    assert e.value.colno == len(bad[-1]) + 1


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_a_utf8_bom_is_accepted(tmp_path, name):
    path = write(tmp_path / name, ROWS)
    rows = read_rows(path)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert read_rows(path) == rows


def test_tokenizer_problems(tokenizer):
    conv = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(UserError, match="conversational .* no chat template"):
        preference_examples_from_rows(conv, no_template, skip_bad=True)
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    with pytest.raises(UserError, match="row 3: the prompt is empty and the tokenizer has no BOS"):
        preference_examples_from_rows(ROWS, no_bos, source="mem")
    odd = copy.deepcopy(tokenizer)  # the generation prompt is not how an assistant turn starts
    odd.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(UserError, match="rendering of prompt \\+ 'chosen' does not start with"):
        preference_examples_from_rows(conv, odd)


# ---- SFT


def test_sft_formats(tokenizer):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    conv = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    pref, _ = preference_examples_from_rows([ROWS[0], conv], tokenizer)
    rows = [
        {"prompt": ROWS[0]["prompt"], "completion": ROWS[0]["chosen"]},
        ROWS[0],
        {"messages": [USER, GOOD]},
        {"prompt": [USER], "completion": [GOOD]},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
        {"text": "the movie was great."},
    ]
    ex, report = sft_examples_from_rows(rows, tokenizer)
    for i, ref in ((0, pref[0]), (1, pref[0]), (2, pref[1]), (3, pref[1]), (4, pref[1])):
        assert (ex[i].prompt_ids, ex[i].completion_ids) == (ref.prompt_ids, ref.chosen_ids)
    # text: the first token (BOS here) is the prompt, the whole text is learned
    assert ex[5].prompt_ids == [bos]
    assert ex[5].completion_ids == tokenizer("the movie was great.").input_ids + [eos]
    assert report.formats == {"standard": 2, "conversational": 2, "implicit-prompt": 1, "text": 1}


@pytest.mark.parametrize(("row", "problem"), [
    ({"messages": [USER]}, "no assistant message"),
    ({"messages": [USER, GOOD, USER]}, "messages after the last assistant message"),
    ({"messages": "hi"}, "must be a list of messages"),
    ({"text": 5}, "field 'text' must be a string, got int"),
    ({"text": " \n"}, "field 'text' is empty"),
    ({"completion": "a"}, "missing field 'prompt'"),
    ({"input": "a"}, "missing fields: need"),
    ({"text": "a", "text_eos": 0}, "field 'text_eos' must be true or false, got int"),
    ({"prompt": "a", "completion": "b", "completion_eos": "no"}, "field 'completion_eos' must be true or false"),
])
def test_bad_sft_rows(tmp_path, tokenizer, row, problem):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "fine."}, row])
    with pytest.raises(UserError) as e:
        load_sft(path, tokenizer)
    assert str(e.value).startswith(f"{path} line 2: ") and problem in str(e.value)
    assert load_sft(path, tokenizer, skip_bad=True)[1].n_skipped == 1


# ---- EOS flags: a completion cut at a length cap did not end, so it gets no EOS


def test_eos_flags_drop_eos_only_where_false(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [{**ROWS[0], "chosen_eos": False}, {**ROWS[0], "chosen_eos": True, "rejected_eos": None},
            {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "rejected_eos": False},
            {"prompt": "1+1=", "chosen": "2<|endoftext|>", "rejected": "3", "chosen_eos": False}]
    (cut, kept, conv, own_eos), _ = preference_examples_from_rows(rows, tokenizer)
    (ref, ref_conv), _ = preference_examples_from_rows(
        [ROWS[0], {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}], tokenizer)
    assert cut.chosen_ids == tokenizer(ROWS[0]["chosen"], add_special_tokens=False).input_ids
    assert cut.chosen_ids + [eos] == ref.chosen_ids and cut.rejected_ids == ref.rejected_ids
    assert ids(kept) == ids(ref)  # true and null mean the default
    assert conv.chosen_ids == ref_conv.chosen_ids and conv.rejected_ids + [eos] == ref_conv.rejected_ids
    assert own_eos.chosen_ids == tokenizer("2", add_special_tokens=False).input_ids + [eos]  # the text's own EOS


def test_sft_eos_flags(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [{"text": "the movie was great."}, {"prompt": "the plot", "completion": " was dull."},
            {"messages": [USER, GOOD]}, {"chosen": [USER, GOOD], "rejected": [USER, BAD]}]
    flags = ["text_eos", "completion_eos", "messages_eos", "chosen_eos"]
    full, _ = sft_examples_from_rows(rows, tokenizer)
    cut, _ = sft_examples_from_rows([{**r, f: False} for r, f in zip(rows, flags, strict=True)], tokenizer)
    for a, b in zip(full, cut, strict=True):
        assert a.prompt_ids == b.prompt_ids and a.completion_ids == b.completion_ids + [eos]
        assert b.completion_ids[-1] != eos
    # a flag of another field does not apply
    other, _ = sft_examples_from_rows([{**rows[0], "completion_eos": False}, {**rows[3], "rejected_eos": False}],
                                      tokenizer)
    assert [e.completion_ids for e in other] == [full[0].completion_ids, full[3].completion_ids]


def test_csv_eos_flags_are_read_as_booleans(tmp_path, tokenizer):
    eos = tokenizer.eos_token_id
    rows = [{**r, "chosen_eos": flag} for r, flag in zip(ROWS, ["false", "TRUE", ""], strict=True)]
    (a, b, c), _ = load_preferences(write(tmp_path / "d.csv", rows), tokenizer)
    ref, _ = load_preferences(write(tmp_path / "d.jsonl", ROWS), tokenizer)
    assert a.chosen_ids + [eos] == ref[0].chosen_ids and a.rejected_ids == ref[0].rejected_ids
    assert [ids(b), ids(c)] == [ids(e) for e in ref[1:]]
    sft, _ = load_sft(write(tmp_path / "s.csv", [{"text": "the movie.", "text_eos": "0"}]), tokenizer)
    assert sft[0].completion_ids[-1] != eos
    path = write(tmp_path / "bad.csv", [rows[0], {**rows[1], "chosen_eos": "yes"}])
    with pytest.raises(UserError) as e:
        load_preferences(path, tokenizer)
    assert str(e.value) == f"{path} line 3: field 'chosen_eos' must be true, false, 1 or 0, got 'yes'"
    assert [ex.row for ex in load_preferences(path, tokenizer, skip_bad=True)[0]] == [2]


# ---- inspect


def test_inspect_reports_counts_and_lengths_before_truncation(tmp_path, tokenizer):
    rows = [json.dumps(r) for r in ROWS] + ['{"prompt": "a", "chosen": 1, "rejected": "b"}']
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    info = inspect_data(path, tokenizer, max_length=6, max_prompt_length=3)
    full, _ = load_preferences(path, tokenizer, skip_bad=True)
    assert (info["kind"], info["format"], info["rows"], info["kept"], info["skipped"]) == (
        "preference", "standard", 4, 3, 1)
    assert info["skipped_rows"][0].startswith(f"{path} line 4: field 'chosen' must be")
    assert info["lengths"]["prompt"]["max"] == max(len(e.prompt_ids) for e in full) > 3
    assert info["lengths"]["chosen"]["p50"] == sorted(len(e.chosen_ids) for e in full)[1]
    assert info["prompt_truncated"] == sum(len(e.prompt_ids) > 3 for e in full)
    sft = inspect_data(write_jsonl(tmp_path / "s.jsonl", [{"messages": [USER, GOOD]}]), tokenizer)
    assert (sft["kind"], sft["format"]) == ("sft", "conversational")
    assert set(sft["lengths"]) == {"prompt", "completion"}

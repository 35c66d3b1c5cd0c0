"""TRL's implicit-prompt preference rows, as Anthropic's HH-RLHF ships them
({"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}): the prompt is cut where TRL's own
extraction cuts it, an empty reply is a reply of EOS only (counted in the data report), and such rows train and show
credit with no hand conversion."""

import json
import random

import pytest
from conftest import write_jsonl

from r2q.data import load_preferences, preference_examples_from_rows

QUESTIONS = ["What is a good movie to watch?", "How do I bake bread?", "Tell me a joke.", "Why is the sky blue?",
             "Can you help me with my homework?", "What should I name my dog?"]
REPLIES = ["I think a classic film would be good.", "Sure, here is how.", "I'm sorry, I can't help with that.",
           "It scatters blue light more.", "Of course!", "I would call it Rex.", "I am not sure."]


def hh_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Rows in HH-RLHF's layout: one or two earlier turns, then the last Assistant reply differs; some empty."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = "".join(f"\n\nHuman: {rng.choice(QUESTIONS)}\n\nAssistant: {rng.choice(REPLIES)}"
                        for _ in range(rng.randint(0, 2)))
        head = f"{turns}\n\nHuman: {rng.choice(QUESTIONS)}\n\nAssistant:"
        a, b = rng.sample(REPLIES, 2)
        if i % 6 == 5:
            b = ""  # an empty reply, as in 4 rows of HH-RLHF's harmless-base test split
        rows.append({"chosen": f"{head} {a}", "rejected": f"{head} {b}" if b else head})
    return rows


def test_the_prompt_is_cut_where_trls_extraction_cuts_it(tokenizer):
    pytest.importorskip("trl")
    from trl.data_utils import maybe_extract_prompt

    rows = hh_rows(40)
    examples, report = preference_examples_from_rows(rows, tokenizer, 1024, 512)
    assert len(examples) == len(rows)
    for row, ex in zip(rows, examples):
        trl = maybe_extract_prompt(dict(row))
        assert tokenizer.decode(ex.prompt_ids) == trl["prompt"]
        eos = tokenizer.eos_token_id
        for side, ids in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            assert ids[-1] == eos
            assert tokenizer.decode(ids[:-1]) == trl[side]
    assert report.formats['implicit-prompt'] == len(rows)


def test_an_empty_reply_is_eos_only_and_counted(tokenizer):
    head = "\n\nHuman: Hi\n\nAssistant:"
    rows = [{"prompt": head, "chosen": " Hello!", "rejected": ""}, {"prompt": head, "chosen": "", "rejected": " Hey"}]
    examples, report = preference_examples_from_rows(rows, tokenizer, 1024, 512)
    assert examples[0].rejected_ids == [tokenizer.eos_token_id] and examples[1].chosen_ids == [tokenizer.eos_token_id]
    assert report.n_empty_completions == 2
    assert any("empty" in line for line in report.notes())


def test_hh_rows_train_and_show_credit_without_conversion(llama_dir, tokenizer, tmp_path, capsys):
    from conftest import run_cli

    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(24))
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "run",
                           "--max-steps", "2", "--batch-size", "4", "--quiet", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    code, out, err = run_cli(capsys, "credit", "--model", tmp_path / "run", "--data", data, "--json",
                             tmp_path / "credit.json", "--quiet")
    assert code == 0, err
    credit = json.loads((tmp_path / "credit.json").read_text())
    assert len(credit["pairs"]) == 24
    # an empty last reply: TRL's cut leaves the prompt one character short, so both replies start with ':'
    short = [p for p in credit["pairs"] if tokenizer.decode(p["rejected"]["token_ids"][:-1]) == ":"]
    assert len(short) == 4 and all(p["prompt"].endswith("Assistant") for p in short)


def test_rows_split_by_hand_with_an_empty_reply_train(llama_dir, tokenizer, tmp_path, capsys):
    from conftest import run_cli

    rows = []
    for r in hh_rows(24):
        head = r["chosen"][: r["chosen"].rindex("Assistant:") + len("Assistant:")]
        rows.append({"prompt": head, "chosen": r["chosen"][len(head):], "rejected": r["rejected"][len(head):]})
    assert sum(r["rejected"] == "" for r in rows) == 4
    data = write_jsonl(tmp_path / "split.jsonl", rows)
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "run",
                           "--max-steps", "2", "--batch-size", "4", "--quiet", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "4 empty completions (EOS alone)" in err


def test_inspect_data_reads_hh_rows(llama_dir, tmp_path, capsys):
    from conftest import run_cli

    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(12))
    code, out, err = run_cli(capsys, "inspect-data", data, "--model", llama_dir)
    assert code == 0, err
    assert "kept 12" in out and "skipped 0" in out


def test_loading_a_file_of_hh_rows_reports_them(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(12))
    examples, report = load_preferences(str(data), tokenizer, max_length=1024, max_prompt_length=512)
    assert len(examples) == 12 and report.formats['implicit-prompt'] == 12
    assert report.n_empty_completions == 0  # TRL's cut never leaves a reply empty

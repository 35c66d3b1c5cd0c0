"""Models that look positions up in a learned table (GPT-2's wpe, OPT's embed_positions) cannot read past it: an
example or a prompt + --max-new-tokens longer than the table is one line naming it (exit 2), before any compute and
with nothing written, in train, sft, credit and generate. Exactly as long as the table runs; rotary models
(Llama) are not limited."""

import json

import pytest
from conftest import one_line_error, pref_rows, run_cli, write_jsonl

from r2q.models import load_model, position_limit
from r2q.toy import save_model, tiny_model

LIMIT = 24


@pytest.fixture(scope="module")
def short_models(tmp_path_factory, tokenizer):
    """gpt2, opt and llama directories whose configs allow LIMIT positions."""
    d = tmp_path_factory.mktemp("short")
    for arch in ("gpt2", "opt", "llama"):
        save_model(tiny_model(arch, len(tokenizer), seed=0, max_positions=LIMIT), tokenizer, d / arch)
    return d


@pytest.fixture(scope="module")
def long_data(tmp_path_factory, tokenizer):
    """Pairs of which row 3 is far longer than LIMIT tokens (prompt and completions both)."""
    rows = pref_rows(12, 0)
    rows[2] = {"prompt": "the movie was great " * 8, "chosen": " a good plot" * 6, "rejected": " a bad plot" * 6}
    return write_jsonl(tmp_path_factory.mktemp("long") / "pairs.jsonl", rows)


def test_position_limit_is_the_table_less_its_offset(short_models):
    gpt2, opt, llama = (load_model(short_models / a) for a in ("gpt2", "opt", "llama"))
    assert opt.model.decoder.embed_positions.num_embeddings == LIMIT + 2  # OPT's table has 2 rows of offset
    assert position_limit(gpt2) == position_limit(opt) == LIMIT
    assert position_limit(llama) is None and position_limit() is None and position_limit(None, llama) is None
    wider = tiny_model("gpt2", 320, max_positions=2 * LIMIT)
    assert position_limit(wider, gpt2) == position_limit(gpt2, None, wider) == LIMIT


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("command", ["train", "sft"])
def test_training_refuses_examples_past_the_table(short_models, long_data, tmp_path, capsys, arch, command):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, command, "--model", short_models / arch, "--data", long_data, "--out", out,
                           "--max-steps", "1", "--batch-size", "4", "--quiet")
    err = one_line_error(code, err)
    assert f"longer than the {LIMIT} positions the model embeds" in err and "the longest, row 3," in err
    assert f"--max-length {LIMIT}" in err
    assert not out.exists()


def test_a_reference_with_a_shorter_table_is_refused(short_models, long_data, tmp_path, capsys, tokenizer):
    wide = tmp_path / "wide"
    save_model(tiny_model("gpt2", len(tokenizer), seed=0, max_positions=512), tokenizer, wide)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", wide, "--ref", short_models / "gpt2", "--data", long_data,
                           "--out", out, "--max-steps", "1", "--batch-size", "4", "--quiet")
    assert f"longer than the {LIMIT} positions" in one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_examples_cut_to_the_table_train_and_get_credit(short_models, long_data, tmp_path, capsys, arch):
    cut = ("--max-length", str(LIMIT), "--max-prompt-length", "12")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", short_models / arch, "--data", long_data, "--out", out,
                           "--epochs", "1", "--batch-size", "4", "--quiet", *cut)
    assert code == 0, err
    credit = tmp_path / "credit.json"
    code, _, err = run_cli(capsys, "credit", "--model", out, "--data", long_data, "--json", credit, "--quiet",
                           "--show", "0", *cut)
    assert code == 0, err
    pairs = json.loads(credit.read_text())["pairs"]
    row3 = next(p for p in pairs if p["row"] == 3)
    # row 3 was cut to exactly the table: 12 prompt tokens and 12 of each completion, all scored
    assert {len(row3["chosen"]["token_ids"]), len(row3["rejected"]["token_ids"])} == {LIMIT - 12}


def test_llama_is_not_limited(short_models, long_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", short_models / "llama", "--data", long_data, "--out",
                           tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--quiet")
    assert code == 0, err


def _generate(capsys, model, tmp_path, text, *args):
    """`r2q generate` on the prompts in `text`; returns (code, stderr, the output path)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(text)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompts", prompts, "--out", out, "--quiet", *args)
    return code, err, out


@pytest.mark.parametrize("method", ["greedy", "beam", "best-of-n"])
def test_generate_refuses_prompts_that_would_run_past_the_table(short_models, tmp_path, capsys, tokenizer, method):
    n = len(tokenizer("the movie was great").input_ids)
    ranking = ["--ranking", "likelihood"] if method == "best-of-n" else []  # (no --ref here)
    code, err, out = _generate(capsys, short_models / "gpt2", tmp_path, "the movie\nthe movie was great\n",
                               "--method", method, "--max-new-tokens", LIMIT - n + 1, *ranking)
    err = one_line_error(code, err)
    assert f"prompt 2 is {n} tokens" in err and f"lower --max-new-tokens to {LIMIT - n}" in err
    assert not out.exists()
    code, err, _ = _generate(capsys, short_models / "gpt2", tmp_path, "the movie was great " * 8 + "\n")
    assert f"shorten it below {LIMIT} tokens" in one_line_error(code, err)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generate_runs_up_to_the_last_position(short_models, tmp_path, capsys, tokenizer, method):
    n = len(tokenizer("the movie was great").input_ids)
    code, err, out = _generate(capsys, short_models / "opt", tmp_path, "the movie was great\n", "--method", method,
                               "--max-new-tokens", LIMIT - n)
    assert code == 0, err
    line = json.loads(out.read_text().splitlines()[0])
    assert len(line["token_ids"]) == LIMIT - n  # ran to the last position (no EOS on the way)


def test_inspect_data_counts_examples_past_the_table(short_models, long_data, capsys):
    code, out, err = run_cli(capsys, "inspect-data", long_data, "--model", short_models / "gpt2")
    assert code == 0, err
    assert f"examples are longer than the {LIMIT} positions the model embeds" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "inspect-data", long_data, "--model", short_models / "llama")
    assert "positions" not in out
    code, out, _ = run_cli(capsys, "inspect-data", long_data, "--model", short_models / "gpt2", "--max-length",
                           LIMIT, "--max-prompt-length", 12)
    assert "positions" not in out


def test_inspect_data_gives_the_count_as_data(short_models, long_data, tokenizer):
    from r2q.data import inspect_data
    from r2q.models import config_position_limit

    assert config_position_limit(short_models / "opt") == LIMIT
    assert config_position_limit(short_models / "llama") is None
    info = inspect_data(long_data, tokenizer, position_limit=LIMIT)
    lengths = [len(tokenizer(r["prompt"]).input_ids) + max(len(tokenizer(r[c], add_special_tokens=False).input_ids)
                                                           for c in ("chosen", "rejected")) + 1
               for r in map(json.loads, long_data.read_text().splitlines())]
    assert info["over_position_limit"] == sum(n > LIMIT for n in lengths) >= 1
    assert info["longest"] == max(lengths)
    assert inspect_data(long_data, tokenizer)["over_position_limit"] is None

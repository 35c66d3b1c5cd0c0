"""The command line: commands exist, write what they promise, and fail on bad input with one line."""

import json
import subprocess
import sys

import pytest


def r2q(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "r2q.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_every_command_takes_exactly_its_config_fields():
    """The CLI is generated: each command's options are its config dataclass's fields, with their defaults."""
    import dataclasses

    import typer

    from r2q.cli import InspectConfig, app
    from r2q.credit import CreditConfig
    from r2q.demo import DemoConfig
    from r2q.search import GenerateConfig
    from r2q.theory import TheoryConfig
    from r2q.train import TrainConfig

    commands = typer.main.get_command(app).commands
    assert set(commands) == {"train", "sft", "generate", "credit", "theory", "demo", "inspect-data", "version"}
    extra = {"generate": {"model", "prompts", "out_path", "ref", "base", "dtype", "attn_implementation", "quiet",
                          "trust_remote_code"}}
    for name, cls in [("train", TrainConfig), ("sft", TrainConfig), ("generate", GenerateConfig),
                      ("credit", CreditConfig), ("theory", TheoryConfig), ("demo", DemoConfig),
                      ("inspect-data", InspectConfig)]:
        params = {p.name: p for p in commands[name].params if p.name != "help"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(params) == set(fields) | extra.get(name, set()) | {"config"}, name  # --config: a file of them
        for k, f in fields.items():
            if f.default != "":  # "" means required or unset
                assert params[k].default == f.default, (name, k)


@pytest.mark.parametrize("method", ["beam", "reward-beam", "best-of-n", "mcts"])
def test_generate_writes_one_line_per_prompt(llama_dir, llama_ref_dir, tmp_path, method):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "12+30="}\n{"prompt": "the movie was"}\n{"prompt": "a"}\n')
    out = tmp_path / "g.jsonl"
    width = {"beam": ["--num-beams", 3], "reward-beam": ["--num-beams", 3], "best-of-n": ["--num-samples", 3],
             "mcts": ["--simulations", 6]}[method]
    r2q("generate", "--model", llama_dir, "--ref", llama_ref_dir, "--prompts", prompts, "--out", out,
        "--method", method, "--max-new-tokens", 6, *width, "--quiet")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["12+30=", "the movie was", "a"]
    for x in lines:
        assert x["method"] == method and 1 <= x["num_tokens"] <= 6 and len(x["token_ids"]) == x["num_tokens"]
        assert x["reward"] is not None and x["compute_forward_passes"] > 0 and x["compute_tokens_processed"] > 0


def test_generate_bad_input_is_one_line(llama_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    r = r2q("generate", "--model", llama_dir, "--prompts", prompts, "--out", tmp_path / "g.jsonl", check=False)
    assert r.returncode == 2 and "row 2" in r.stderr and "prompt" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    r = r2q("generate", "--model", llama_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g.jsonl",
            check=False)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = r2q("generate", "--model", llama_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g.jsonl",
            "--method", "reward-beam", check=False)
    assert r.returncode == 2 and "--ref" in r.stderr
    assert not (tmp_path / "g.jsonl").exists()


def test_inspect_data(llama_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "x"}\n')
    out = r2q("inspect-data", f, "--model", llama_dir).stdout
    assert "rows 2" in out and "kept 1" in out and "skipped 1" in out and "line 2" in out


def test_inspect_data_counts_pairs_without_a_preference_and_mixed_formats(llama_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "a", "chosen": "b", "rejected": "b"}\n'
                 '{"chosen": "the film was good", "rejected": "the film was bad"}\n')
    out = r2q("inspect-data", f, "--model", llama_dir).stdout
    assert "chosen identical to rejected 1" in out and "formats standard 2, implicit-prompt 1" in out


def test_generate_prompts_from_a_data_set_directory_and_what_is_skipped(llama_dir, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a", "the film"]}).save_to_disk(str(tmp_path / "ds"))
    r = r2q("generate", "--model", llama_dir, "--prompts", tmp_path / "ds", "--out", tmp_path / "g.jsonl",
            "--max-new-tokens", 2, "--quiet")
    assert [json.loads(x)["prompt"] for x in (tmp_path / "g.jsonl").read_text().splitlines()] == ["a", "the film"]
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\n  \nthe film\n")
    r = r2q("generate", "--model", llama_dir, "--prompts", txt, "--out", tmp_path / "g.jsonl", "--max-new-tokens", 2,
            "--quiet")
    assert "p.txt: 2 blank lines skipped; 2 prompts, one output line each" in r.stderr
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"prompt": "a"}\n{"text": "b", "id": 3}\n')
    r = r2q("generate", "--model", llama_dir, "--prompts", rows, "--out", tmp_path / "h.jsonl", check=False)
    assert r.returncode == 2 and "row 2: no 'prompt' field (its fields: text, id)" in r.stderr


def test_credit_png_must_be_named_png(llama_dir, tmp_path):
    r = r2q("credit", "--model", llama_dir, "--ref", llama_dir, "--prompt", "a", "--response", "b", "--png",
            tmp_path / "x.jpg", check=False)
    assert r.returncode == 2 and "must end in .png" in r.stderr and not (tmp_path / "x.jpg").exists()

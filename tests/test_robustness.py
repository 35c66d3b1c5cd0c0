"""Nothing lost, nothing silent: checkpoints that cannot resume wrongly, one line (exit 2) for every bad option,
value, path or file, and nothing half-written left behind. Each test names the case of issue 11 it covers."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ckpt_cfg, one_line_error, pref_rows, run_cli, write_jsonl
from safetensors.torch import load_file, save_file

from r2q.checkpoint import list_checkpoints, load_weights, verify, write_manifest
from r2q.errors import UserError
from r2q.toy import save_model, tiny_model
from r2q.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    return write_jsonl(d / "train.jsonl", pref_rows(32, 0))


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


# ---------------------------------------------------------------------------------------------- 1, 3, 8: resume


def _damage(ck: Path, how: str) -> None:
    f = ck / "model.safetensors"
    if how == "deleted":
        f.unlink()
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "pickle only":  # a consistent manifest, but only weights r2q will not unpickle
        f.rename(ck / "pytorch_model.bin")
        write_manifest(ck)
    elif how == "manifest missing":  # what a kill between the files and the manifest leaves
        (ck / "manifest.json").unlink()


@pytest.mark.parametrize("how", ["deleted", "truncated", "pickle only", "manifest missing"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(llama_dir, data, tmp_path, capsys, how):
    """1, 8: the run resumes from step 3, not from the starting weights, and ends where the whole run ended."""
    c = ckpt_cfg(llama_dir, data, tmp_path / "run")
    full = train(c)
    final = weights(tmp_path / "run")
    cks = list_checkpoints(tmp_path / "run")
    assert [ck.name for ck in cks] == [f"step-{i:07d}" for i in (1, 2, 3, 4)]
    assert all(verify(ck) is None for ck in cks)
    _damage(cks[-1], how)
    assert verify(cks[-1]) is not None
    capsys.readouterr()
    res = train(dataclasses.replace(c, resume=True))
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {cks[-1]}" in err and f"resuming from {cks[-2]} (step 3 of 4)" in err
    assert res.steps == 4 and [m["step"] for m in res.metrics] == [4]
    assert res.metrics[0]["loss"] == pytest.approx(full.metrics[3]["loss"], abs=1e-6)  # not log 2 again
    for k, v in weights(tmp_path / "run").items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)


def test_no_usable_checkpoint_is_an_error_and_no_checkpoint_starts_over_said_so(llama_dir, data, tmp_path, capsys):
    c = ckpt_cfg(llama_dir, data, tmp_path / "run", max_steps=2)
    train(c)
    for ck in list_checkpoints(tmp_path / "run"):
        _damage(ck, "truncated")
    with pytest.raises(UserError, match="none of the 2 checkpoints .* is usable"):
        train(dataclasses.replace(c, resume=True))
    fresh = ckpt_cfg(llama_dir, data, tmp_path / "new", max_steps=1)
    capsys.readouterr()
    train(dataclasses.replace(fresh, resume=True))
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_strict_loading_names_missing_and_misshapen_tensors(tokenizer, tmp_path):
    m = tiny_model("gpt2", len(tokenizer))  # tied input and output embeddings: saved once, loaded fine
    d = save_model(m, tokenizer, tmp_path / "m")
    load_weights(tiny_model("gpt2", len(tokenizer), seed=1), d)
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if k.endswith("attn.c_attn.weight"))
    save_file({k: v for k, v in sd.items() if k != key}, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 tensors missing"):
        load_weights(m, d)
    save_file(dict(sd, **{key: sd[key][:, :4].contiguous()}), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has shape"):
        load_weights(m, d)


def test_fresh_run_into_an_earlier_run_refuses_and_resume_checks_the_settings(llama_dir, data, tmp_path):
    """3: the earlier run's checkpoints are never mixed with, resumed under other settings, or deleted silently."""
    c = ckpt_cfg(llama_dir, data, tmp_path / "run", max_steps=2)
    train(c)
    with pytest.raises(UserError, match="holds an earlier run.*--resume.*--overwrite"):
        train(dataclasses.replace(c, lr=1e-3))
    with pytest.raises(UserError, match=r"other settings: --lr 0.002 -> 0.001"):
        train(dataclasses.replace(c, lr=1e-3, resume=True))
    other = write_jsonl(tmp_path / "other.jsonl", pref_rows(32, 5))
    with pytest.raises(UserError, match="--data"):
        train(dataclasses.replace(c, data=str(other), resume=True))
    shutil.copy(other, tmp_path / "same-name.jsonl")
    c2 = ckpt_cfg(llama_dir, tmp_path / "same-name.jsonl", tmp_path / "run2", max_steps=1)
    train(c2)
    shutil.copy(data, tmp_path / "same-name.jsonl")  # same path, other rows
    with pytest.raises(UserError, match="the training data"):
        train(dataclasses.replace(c2, max_steps=1, resume=True))
    res = train(dataclasses.replace(c, lr=1e-3, overwrite=True, max_steps=1))
    assert res.steps == 1 and [ck.name for ck in list_checkpoints(tmp_path / "run")] == ["step-0000001"]
    with pytest.raises(UserError, match="contradict"):
        dataclasses.replace(c, resume=True, overwrite=True) and train(dataclasses.replace(c, resume=True,
                                                                                          overwrite=True))


def test_half_written_metrics_line_is_dropped_on_resume(llama_dir, data, tmp_path, capsys):
    """8: what a SIGKILL while appending to metrics.jsonl leaves."""
    c = ckpt_cfg(llama_dir, data, tmp_path / "run", max_steps=3)
    train(c)
    m = tmp_path / "run" / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 4, "split": "tr')
    shutil.rmtree(list_checkpoints(tmp_path / "run")[-1])
    capsys.readouterr()
    train(dataclasses.replace(c, resume=True))
    assert "line 4: not a complete metrics line" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- 4, 5: references


def test_credit_finds_the_recorded_reference_from_another_directory(llama_dir, llama_ref_dir, data, tmp_path,
                                                                    monkeypatch, capsys):
    """4: train records absolute paths; a relative path recorded by an older r2q is refused, not guessed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(llama_dir, tmp_path / "a" / "start")
    shutil.copytree(llama_ref_dir, tmp_path / "b" / "start")  # same relative name, another model
    monkeypatch.chdir(tmp_path / "a")
    train(ckpt_cfg("start", data, tmp_path / "run", max_steps=1, save_every=0))
    rec = json.loads((tmp_path / "run" / "r2q_config.json").read_text())
    assert rec["model"] == str(tmp_path / "a" / "start") and rec["data"] == str(data)
    monkeypatch.chdir(tmp_path / "b")
    code, out, err = run_cli(capsys, "credit", "--model", tmp_path / "run", "--prompt", "the film",
                             "--response", " was good.", "--quiet", "--show", "0", "--json", "c.json")
    assert code == 0, err
    assert json.loads(Path("c.json").read_text())["meta"]["ref"] == str(tmp_path / "a" / "start")
    rec["model"] = "start"
    (tmp_path / "run" / "r2q_config.json").write_text(json.dumps(rec))
    code, out, err = run_cli(capsys, "credit", "--model", tmp_path / "run", "--prompt", "a", "--response", "b")
    assert "relative path 'start'" in one_line_error(code, err)


def test_reference_with_another_vocabulary_is_refused(llama_dir, tokenizer, data, tmp_path, capsys):
    """5: a reference saved without tokenizer files is still checked, by its output layer."""
    for extra in (16, -8):
        ref = tmp_path / f"ref{extra}"
        tiny_model("llama", len(tokenizer) + extra).save_pretrained(ref)  # weights only
        with pytest.raises(UserError, match="the policy scores .* tokens but the reference"):
            train(ckpt_cfg(llama_dir, data, tmp_path / f"run{extra}", ref=str(ref)))
        code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", ref, "--prompt", "a",
                               "--response", "b", "--quiet")
        assert "shared vocabulary" in one_line_error(code, err)
        assert not (tmp_path / f"run{extra}").exists()


# ---------------------------------------------------------------------------------------------- 2, 6, 7, 9, 13


TRAIN_BAD = [("--max-grad-norm", "-1"), ("--max-steps", "-5"), ("--epochs", "0"), ("--epochs", "-2"),
             ("--lr", "0"), ("--lr", "-1"), ("--weight-decay", "-1"), ("--log-every", "0"),
             ("--label-smoothing", "1.5"), ("--max-length", "1"), ("--batch-size", "0"), ("--keep-last", "0"),
             ("--eval-fraction", "1"), ("--beta", "0"), ("--loss", "dpo"), ("--seed", "-1")]
GENERATE_BAD = [("--temperature", "-1"), ("--temperature", "0"), ("--simulations", "0"), ("--chunk-len", "0"),
                ("--batch-size", "0"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"),
                ("--expand-top-k", "0"), ("--num-beams", "0"), ("--max-new-tokens", "0"), ("--method", "bfs")]
CREDIT_BAD = [("--show", "-1"), ("--batch-size", "0"), ("--batch-size", "-2"), ("--max-length", "1"),
              ("--beta", "-0.1"), ("--dtype", "fp8")]


@pytest.mark.parametrize("flag,value", TRAIN_BAD)
def test_nonsense_train_options_are_refused_before_anything_runs(llama_dir, data, tmp_path, capsys, flag, value):
    """2, 6, 9: --max-grad-norm -1 used to reverse the gradient; the others trained nothing or crashed later."""
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "o", flag,
                           value)
    assert one_line_error(code, err).startswith(f"error: {flag} ")
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "o",
                           "--loss", "cdpo", "--label-smoothing", "0.2", "--max-steps", "1", "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("flag,value", GENERATE_BAD)
def test_nonsense_generate_options_are_refused(llama_dir, llama_ref_dir, tmp_path, capsys, flag, value):
    """6, 7, 9: --chunk-len 0 used to hang; --temperature -1 decoded greedily."""
    (tmp_path / "p.txt").write_text("hello\n")
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--ref", llama_ref_dir, "--prompts",
                           tmp_path / "p.txt", "--out", tmp_path / "g.jsonl", "--method", "chunk-beam", flag, value)
    assert one_line_error(code, err).startswith(f"error: {flag} ")
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.parametrize("flag,value", CREDIT_BAD)
def test_nonsense_credit_options_are_refused(llama_dir, tmp_path, capsys, flag, value):
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_dir, "--prompt", "a",
                           "--response", "b", flag, value)
    assert one_line_error(code, err).startswith(f"error: {flag} ")


def test_scorer_output_and_prompt_files_are_checked(llama_dir, tmp_path, capsys, monkeypatch):
    """9: a scorer module in the current directory is found; a wrong number of scores is one line."""
    monkeypatch.chdir(tmp_path)
    Path("myscorer.py").write_text("def score(prompts, completions):\n    return [0.0]\n")
    Path("p.txt").write_text("hello\nthe film\n")
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", "p.txt", "--out", "g.jsonl",
                           "--method", "best-of-n", "--ranking", "external", "--scorer", "myscorer:score",
                           "--num-samples", "3", "--max-new-tokens", "3", "--quiet")
    assert "returned 1 scores for 6 completions" in one_line_error(code, err)
    assert not Path("g.jsonl").exists()
    Path("bad.txt").write_bytes(b"hello\nthe \xff film\n")
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", "bad.txt", "--out", "g.jsonl")
    assert "bad.txt line 2: not UTF-8" in one_line_error(code, err)


def test_help_and_messages(llama_dir, tmp_path, capsys, monkeypatch):
    """13: help shows defaults as they are; a missing model is named; paths are printed, not styled."""
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run_cli(capsys, "credit", "--help")
    delim = next(ln for ln in out.splitlines() if "--delimiter" in ln)
    assert "\\n" in delim and "[default: (\\n)]" in delim
    assert "the one r2q train recorded, else 0.1" in out
    _, out, _ = run_cli(capsys, "generate", "--help")
    assert "RUNS that Python code" in " ".join(out.replace("│", " ").split())
    code, _, err = run_cli(capsys, "train", "--model", tmp_path / "nope", "--data", tmp_path / "d.jsonl",
                           "--out", tmp_path / "o")
    assert f"{tmp_path / 'nope'}: no such model directory" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "inspect-data", tmp_path / "bad" / "[reverse]x.jsonl", "--model", llama_dir)
    assert "bad/[reverse]x.jsonl: no such file" in one_line_error(code, err)
    f = tmp_path / "[red]d.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    code, out, _ = run_cli(capsys, "inspect-data", f, "--model", llama_dir)
    assert code == 0 and "[red]d.jsonl" in out


def test_rows_cut_skipped_or_identical_are_reported_by_train_and_credit(llama_dir, tmp_path, capsys):
    """6, 12: not only by inspect-data."""
    rows = [{"prompt": "the film", "chosen": " was good.", "rejected": " was good."},
            {"prompt": "a", "chosen": " b " * 40, "rejected": " c"}, {"prompt": "x"}] + pref_rows(8, 1)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", f, "--out", tmp_path / "o",
                           "--max-steps", "1", "--skip-bad", "--max-length", "24", "--max-prompt-length", "8",
                           "--quiet")
    assert code == 0, err
    assert "1 skipped" in err and "1 with chosen identical" in err and "line 3: missing field 'chosen'" in err
    assert re.search(r"[1-9]\d* rows with a truncated completion", err)
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_dir, "--data", f, "--skip-bad",
                           "--max-length", "24", "--max-prompt-length", "8", "--quiet", "--show", "0")
    assert code == 0 and "1 skipped" in err and "1 with chosen identical" in err


# ---------------------------------------------------------------------------------------------- 8, 10: files


def test_truncated_model_weights_are_one_line(llama_dir, tmp_path, capsys):
    bad = shutil.copytree(llama_dir, tmp_path / "bad")
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    (tmp_path / "p.txt").write_text("hi\n")
    code, _, err = run_cli(capsys, "generate", "--model", bad, "--prompts", tmp_path / "p.txt", "--out",
                           tmp_path / "g.jsonl")
    assert f"cannot load a model from {bad}" in one_line_error(code, err)


def test_output_paths_are_checked_before_any_compute(llama_dir, data, tmp_path, capsys):
    """10: read-only and wrong-kind output paths fail in a second, and leave nothing behind."""
    (tmp_path / "p.txt").write_text("hello\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    unwritable = Path("/proc/r2q-cannot-write-here")
    common = ("--model", llama_dir, "--quiet")
    cases = [
        ("train", "--data", data, "--out", unwritable, *common),
        ("train", "--data", data, "--out", a_file, *common),
        ("train", "--data", data, "--out", a_file / "sub", *common),
        ("generate", "--prompts", tmp_path / "p.txt", "--out", unwritable / "g.jsonl", *common),
        ("generate", "--prompts", tmp_path / "p.txt", "--out", tmp_path, *common),
        ("credit", "--ref", llama_dir, "--prompt", "a", "--response", "b", "--json", unwritable / "c.json", *common),
        ("credit", "--ref", llama_dir, "--prompt", "a", "--response", "b", "--html", tmp_path, *common),
        ("credit", "--ref", llama_dir, "--prompt", "a", "--response", "b", "--png", a_file / "x.png", *common),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in cases:
        code, _, err = run_cli(capsys, *args)
        msg = one_line_error(code, err)
        assert "cannot write" in msg or "directory" in msg or "is a file" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray .tmp, no half-made dirs
    assert a_file.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- the fuzz


def _options(command: str) -> list[tuple[str, str]]:
    """(--flag, type name) of every value-taking option of a command, read from the CLI itself."""
    import typer

    from r2q.cli import app

    cmd = typer.main.get_command(app).commands[command]
    out = []
    for p in cmd.params:
        if getattr(p, "is_flag", False) or not p.opts or not p.opts[0].startswith("--") or p.name == "help":
            continue
        t = p.bare_type()
        out.append((p.opts[0], getattr(t, "__name__", str(t))))
    return out


FUZZ_VALUES = ["0", "-1", "-5", "99999999999999999999", "1e400", "", "abc", "nan", "-inf", "[x]"]


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "p.txt").write_text("hello\n")
    return d


def _fuzz_args(command: str, d: Path) -> list:
    """Arguments that pass every check before model loading and then stop at a missing model: a value that
    passes the option checks costs no compute."""
    missing = d / "no-such-model"
    return {
        "train": ["--model", missing, "--data", d / "p.txt", "--out", d / "out"],
        "sft": ["--model", missing, "--data", d / "p.txt", "--out", d / "out"],
        "generate": ["--model", missing, "--prompts", d / "p.txt", "--out", d / "g.jsonl"],
        "credit": ["--model", missing, "--ref", missing, "--prompt", "a", "--response", "b", "--json",
                   d / "c.json"],
        "demo": ["--out", "/proc/r2q-no-demo-here"],
        "theory": ["--out", "/proc/r2q-no-theory-here"],
        "inspect-data": [d / "p.txt", "--model", missing],
    }[command]


@pytest.mark.parametrize("command", ["train", "sft", "generate", "credit", "demo", "theory", "inspect-data"])
def test_fuzz_every_option_with_bad_values_is_one_line(command, fuzz_files, capsys, monkeypatch):
    """Every value-taking option of every command, given zero, negative, huge, empty, wrong-type and non-finite
    values: exit 2 with one line and no traceback, and nothing written. A value the option accepts stops at the
    missing model (or the unwritable --out), also one line: so every path through option parsing is covered
    without computing anything. Numeric options must reject huge, non-finite and non-numeric values by name."""
    monkeypatch.chdir(fuzz_files)
    before = sorted(p.name for p in fuzz_files.iterdir())
    args = _fuzz_args(command, fuzz_files)
    opts = [(f, t) for f, t in _options(command) if not (command in ("demo", "theory") and f == "--out")]
    assert len(opts) >= 1
    for flag, typ in opts:
        for v in FUZZ_VALUES:
            rest = list(args)
            if flag in rest:  # replace the base value of this option
                i = rest.index(flag)
                rest = rest[:i] + rest[i + 2 :]
            code, _, err = run_cli(capsys, command, *rest, flag, v)
            msg = one_line_error(code, err)
            if (typ == "int" and v in ("99999999999999999999", "1e400", "nan", "abc")) or (
                    typ == "float" and v in ("1e400", "nan", "-inf", "abc")):
                assert flag in msg, (flag, v, msg)
        assert sorted(p.name for p in fuzz_files.iterdir()) == before, (flag, "left something behind")


def test_fuzz_damaged_data_files_through_the_cli(llama_dir, tmp_path, capsys):
    """Every data format, truncated, not UTF-8 and random bytes, through train: one line, nothing written."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4
    rng = random.Random(0)
    noise = bytes(rng.randrange(256) for _ in range(3000))
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "good.parquet")
    pbytes = (tmp_path / "good.parquet").read_bytes()
    jl = "".join(json.dumps(r) + "\n" for r in good).encode()
    files = {
        "cut.jsonl": jl[: len(jl) - 9], "latin1.jsonl": jl + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
        "noise.jsonl": noise, "cut.json": json.dumps(good).encode()[:-7], "noise.json": noise,
        "latin1.json": json.dumps(good).replace("a", "\xe9").encode("latin-1"),
        "cut.csv": b'prompt,chosen,rejected\na,"b', "noise.csv": noise,
        "latin1.csv": "prompt,chosen,rejected\n\xe9,b,c\n".encode("latin-1"),
        "cut.parquet": pbytes[: len(pbytes) // 2], "noise.parquet": noise, "empty.jsonl": b"",
    }
    for name, content in files.items():
        f = tmp_path / name
        f.write_bytes(content)
        code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", f, "--out", tmp_path / "o",
                               "--quiet")
        assert name in one_line_error(code, err)
        assert not (tmp_path / "o").exists()


def test_sft_refuses_dpo_options_and_tokenising_progress_changes_nothing(llama_dir, data, tokenizer, tmp_path,
                                                                         capsys):
    for flag, value in (("--beta", "0.3"), ("--ref", "none"), ("--loss", "ipo"), ("--precompute-ref", None)):
        code, _, err = run_cli(capsys, "sft", "--model", llama_dir, "--data", data, "--out", tmp_path / "o", flag,
                               *([value] if value else []))
        assert one_line_error(code, err) == f"error: {flag} is a DPO option (r2q train); r2q sft does not use it"
    from r2q.data import load_preferences

    assert load_preferences(data, tokenizer, progress=True)[0] == load_preferences(data, tokenizer)[0]

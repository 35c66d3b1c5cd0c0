"""--config FILE: YAML or JSON keys fill the command's options, the command line overrides them, a run's
r2q_config.json is a config file, and an unknown key or a wrong type stops with one line naming it."""

import json

import pytest
from conftest import one_line_error, pref_rows, run_cli, write_jsonl

from r2q.config import read_config_file
from r2q.errors import UserError
from r2q.train import TrainConfig


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", pref_rows(32, 0))


def test_yaml_fills_options_and_the_command_line_wins(llama_dir, data, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {llama_dir}\ndata: {data}\nmax-steps: 3\nlr: 1.0e-3\nbatch_size: 4\nbeta: 0.2\n"
                   f"cache_dir: {tmp_path / 'cache'}\nquiet: true\n")
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--out", tmp_path / "a", "--max-steps", "2")
    assert code == 0, err
    rec = json.loads((tmp_path / "a" / "r2q_config.json").read_text())
    assert (rec["max_steps"], rec["lr"], rec["batch_size"], rec["beta"]) == (2, 1e-3, 4, 0.2)
    metrics = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_a_runs_record_is_a_config(llama_dir, data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "a",
                           "--max-steps", "2", "--batch-size", "4", "--lr", "3e-3", "--quiet",
                           "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "a" / "r2q_config.json", "--out", tmp_path / "b")
    assert code == 0, err
    a, b = (json.loads((tmp_path / d / "r2q_config.json").read_text()) for d in ("a", "b"))
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert a["inputs"] == b["inputs"]  # the same model, reference, tokenizer and data, by content


def test_unknown_keys_and_wrong_types_are_one_line(llama_dir, data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(llama_dir), "learning_rate": 1e-3}))
    code, _, err = run_cli(capsys, "train", "--config", bad, "--data", data, "--out", tmp_path / "x")
    assert "unknown option 'learning_rate'" in one_line_error(code, err)
    bad.write_text(json.dumps({"max_steps": "ten"}))
    code, _, err = run_cli(capsys, "train", "--config", bad, "--out", tmp_path / "x")
    assert "'max_steps' must be an integer, got str 'ten'" in one_line_error(code, err)
    bad.write_text("{not json")
    code, _, err = run_cli(capsys, "train", "--config", bad, "--out", tmp_path / "x")
    assert "not valid JSON" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "x")
    assert "cannot read it" in one_line_error(code, err)
    assert not (tmp_path / "x").exists()


def test_the_file_reader_types_values():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text("lr: 1\nepochs: 2\nmax_steps: 4.0\nshare_prefix: false\n# a comment\n")
        assert read_config_file(str(p), TrainConfig) == {"lr": 1.0, "epochs": 2.0, "max_steps": 4,
                                                         "share_prefix": False}
        p.write_text("max_steps: true\n")
        with pytest.raises(UserError, match="'max_steps' must be an integer, got bool"):
            read_config_file(str(p), TrainConfig)
        p.write_text("- a\n- b\n")
        with pytest.raises(UserError, match="expected a mapping"):
            read_config_file(str(p), TrainConfig)


def test_what_editors_and_yaml_write_is_read_as_meant(tmp_path):
    """A UTF-8 BOM, an empty file (JSON as YAML), and YAML 1.1's `1e-3` (a string to PyYAML) where a number goes."""
    p = tmp_path / "c.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"max_steps": 3}).encode())
    assert read_config_file(str(p), TrainConfig) == {"max_steps": 3}
    for name in ("e.json", "e.yaml"):
        (tmp_path / name).write_text(" \n")
        assert read_config_file(str(tmp_path / name), TrainConfig) == {}
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-3\nbeta: 5E-2\nweight_decay: -1e+0\n")
    assert read_config_file(str(y), TrainConfig) == {"lr": 1e-3, "beta": 0.05, "weight_decay": -1.0}
    y.write_text("lr: 1e-3x\n")
    with pytest.raises(UserError, match="'lr' must be a number, got str '1e-3x'"):
        read_config_file(str(y), TrainConfig)
    y.write_text("max_steps: 1e3\n")  # an integer option is not read from an exponent
    with pytest.raises(UserError, match="'max_steps' must be an integer"):
        read_config_file(str(y), TrainConfig)

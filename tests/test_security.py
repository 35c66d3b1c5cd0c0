"""What a security audit (2026-12-08) found: a reward-model directory given as --scorer could run its own code (with
"y" on stdin, whatever --trust-remote-code said), a run record turned trust_remote_code on for whoever passed it as
--config, and a config.json naming a hub attention kernel would have it fetched and run. Each is closed here."""

import io
import json
import shutil

import pytest
from conftest import one_line_error, pref_rows, run_cli, train_cfg, write_jsonl

from r2q.errors import UserError
from r2q.train import train

CODE = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the directory's code ran")
from transformers import PretrainedConfig
class Cfg(PretrainedConfig):
    model_type = "custom-scorer"
"""


def _coded_dir(tmp_path, auto_map):
    d = tmp_path / "coded"
    d.mkdir()
    (d / "code.py").write_text(CODE)
    (d / "config.json").write_text(json.dumps({"model_type": "custom-scorer", "auto_map": auto_map}))
    return d


def test_a_reward_model_directory_never_runs_its_own_code(tmp_path, monkeypatch):
    from r2q.search.bon import load_external_scorer

    d = _coded_dir(tmp_path, {"AutoConfig": "code.Cfg", "AutoModelForSequenceClassification": "code.Cfg"})
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))  # transformers asks whether to run it: yes
    with pytest.raises(UserError, match="cannot load a reward model"):
        load_external_scorer(str(d))
    assert not (d / "RAN").exists()


def test_a_run_record_does_not_carry_trust_remote_code(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(8, 0))
    train(train_cfg(llama_dir, data, tmp_path / "run", max_steps=1, trust_remote_code=True))
    record = json.loads((tmp_path / "run" / "r2q_config.json").read_text())
    assert "trust_remote_code" not in record and record["lr"] > 0
    # passed as --config, the record repeats the run with the model's code off
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "run" / "r2q_config.json", "--out",
                           tmp_path / "again", "--quiet")
    assert code == 0, err
    assert "trust_remote_code" not in json.loads((tmp_path / "again" / "r2q_config.json").read_text())
    old = dict(record, trust_remote_code=True)  # a record of an earlier r2q, which held the key
    (tmp_path / "old.json").write_text(json.dumps(old))
    from r2q.config import read_config_file
    from r2q.train import TrainConfig

    assert "trust_remote_code" not in read_config_file(str(tmp_path / "old.json"), TrainConfig)
    assert "trust_remote_code is not applied" in capsys.readouterr().err


def test_a_hub_attention_kernel_in_config_json_is_refused(llama_dir, tmp_path):
    from r2q.models import load_model

    m = tmp_path / "kernel"
    shutil.copytree(llama_dir, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(dict(cfg, attn_implementation="evilorg/evil-kernel")))
    with pytest.raises(UserError, match="asks for the attention kernel 'evilorg/evil-kernel' from the hub"):
        load_model(m)
    (m / "config.json").write_text(json.dumps(dict(cfg, attn_implementation={"": "evilorg/evil-kernel"})))
    with pytest.raises(UserError, match="asks for the attention kernel 'evilorg/evil-kernel' from the hub"):
        load_model(m)  # the form of one kernel per sub-config
    assert load_model(m, attn="sdpa").config._attn_implementation == "sdpa"  # a kernel chosen by the user


def test_option_help_says_where_code_runs(capsys):
    for command in ("train", "credit", "generate"):
        code, out, _ = run_cli(capsys, command, "--help")
        text = " ".join(out.replace("│", " ").split())
        assert "Run Python code shipped in the model's directory" in text, command
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert "RUNS that Python code" in " ".join(out.replace("│", " ").split())


def test_one_line_for_a_missing_kernel_package_names_the_option(tmp_path, capsys):
    code, _, err = run_cli(capsys, "credit", "--model", tmp_path, "--prompt", "a", "--response", "b", "--ref",
                           tmp_path, "--attn-implementation", "flash_attention_3")
    assert "--attn-implementation flash_attention_3 needs" in one_line_error(code, err)

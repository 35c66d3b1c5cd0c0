"""--attn-implementation on train, sft, credit and generate: the kernel each model runs, the same numbers from each
kernel (FlexAttention included, uncompiled on the CPU), and one line for a kernel that cannot run here (a flash
kernel without its package, whether asked for or named by config.json; FlexAttention training on the CPU)."""

import json

import pytest
from conftest import one_line_error, pref_rows, run_cli, train_cfg, write_jsonl

from r2q.errors import UserError
from r2q.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("attn") / "pairs.jsonl", pref_rows(16, 0))


def test_train_runs_the_kernel_asked_for_with_the_same_losses(llama_dir, data, tmp_path):
    runs = {impl: train(train_cfg(llama_dir, data, tmp_path / impl, max_steps=2, batch_size=4, ref="init",
                                  attn_implementation=impl)) for impl in ("eager", "sdpa")}
    assert {impl: r.model.config._attn_implementation for impl, r in runs.items()} == {"eager": "eager",
                                                                                       "sdpa": "sdpa"}
    assert [m["loss"] for m in runs["eager"].metrics] == pytest.approx([m["loss"] for m in runs["sdpa"].metrics],
                                                                        abs=1e-5)


def test_flex_attention_training_on_the_cpu_is_one_line(llama_dir, data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "o",
                           "--attn-implementation", "flex_attention", "--max-steps", "1", "--quiet")
    assert "runs flex_attention, which has no backward on the CPU" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_credit_with_flex_attention_gives_sdpas_numbers(llama_dir, llama_ref_dir, data, tmp_path, capsys):
    """Prefix-shared pairs go to FlexAttention as a BlockMask (run uncompiled on the CPU): the same per-token
    rewards as sdpa's boolean mask."""
    got = {}
    for impl in ("sdpa", "flex_attention"):
        out = tmp_path / f"{impl}.json"
        code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--data", data,
                               "--json", out, "--attn-implementation", impl, "--quiet", "--show", "0")
        assert code == 0, err
        got[impl] = [p["chosen"]["rewards"] + p["rejected"]["rewards"] for p in json.loads(out.read_text())["pairs"]]
    for a, b in zip(got["sdpa"], got["flex_attention"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_generate_with_flex_attention_gives_sdpas_beams(llama_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film was\na\nthe movie\n")
    lines = {}
    for impl in ("sdpa", "flex_attention"):
        out = tmp_path / f"{impl}.jsonl"
        code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", prompts, "--out", out,
                               "--method", "beam", "--num-beams", "3", "--max-new-tokens", "8",
                               "--attn-implementation", impl, "--quiet")
        assert code == 0, err
        lines[impl] = [json.loads(x)["token_ids"] for x in out.read_text().splitlines()]
    assert lines["sdpa"] == lines["flex_attention"]


@pytest.mark.parametrize("command", ["train", "credit", "generate"])
def test_a_flash_kernel_without_its_package_is_one_line_before_loading(tmp_path, capsys, command):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    nowhere = tmp_path / "nowhere"  # never read: the refusal comes first
    args = {"train": ["--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"],
            "credit": ["--prompt", "a", "--response", "b", "--ref", nowhere],
            "generate": ["--prompts", tmp_path / "p.txt", "--out", tmp_path / "o.jsonl"]}[command]
    (tmp_path / "p.txt").write_text("a\n")
    code, _, err = run_cli(capsys, command, "--model", nowhere, *args, "--attn-implementation", "flash_attention_2")
    assert "flash_attention_2 needs the flash-attn package" in one_line_error(code, err)


def test_a_config_json_that_asks_for_a_missing_kernel_is_one_line(llama_dir, data, tmp_path, capsys):
    import importlib.util
    import shutil

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    m = tmp_path / "flash"
    shutil.copytree(llama_dir, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(attn_implementation="flash_attention_2", _attn_implementation="flash_attention_2")
    (m / "config.json").write_text(json.dumps(cfg))
    for command in ("train", "sft"):
        code, _, err = run_cli(capsys, command, "--model", m, "--data", data, "--out", tmp_path / command,
                               "--max-steps", "1", "--quiet")
        err = one_line_error(code, err)
        assert f"{m}/config.json asks for flash_attention_2, whose package is not installed" in err
        assert "--attn-implementation" in err
    # the option overrides what config.json asks for
    res = train(train_cfg(m, data, tmp_path / "sdpa", max_steps=1, batch_size=4, attn_implementation="sdpa"))
    assert res.model.config._attn_implementation == "sdpa"


def test_bad_values_are_refused_with_the_choices(tmp_path, capsys):
    from r2q.train import TrainConfig

    with pytest.raises(UserError, match="--attn-implementation must be one of '', eager, sdpa"):
        TrainConfig(attn_implementation="bogus")
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path, "--prompts", tmp_path / "p", "--out",
                           tmp_path / "o", "--attn-implementation", "bogus")
    assert "--attn-implementation must be one of" in one_line_error(code, err)

"""Inputs an audit of the CLI found mishandled (2026-12-07): outputs over inputs, a --model inside --out, records that
blocked a given --ref or crashed on a wrong type, an explicit --beta 0, a scorer of the wrong shape, NaN weights,
pairs made identical by the cut, config keys given twice, an empty --response. Each is one line (exit 2) before
compute, or a correct run, and nothing the command reads is touched."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import one_line_error, pref_rows, run_cli, train_cfg, write_jsonl
from safetensors.torch import load_file, save_file

from r2q.errors import UserError
from r2q.train import train


@pytest.fixture(scope="module")
def run_dir(llama_dir, tmp_path_factory):
    """A trained run (1 step) with its r2q_config.json, and its data file."""
    d = tmp_path_factory.mktemp("guards")
    data = write_jsonl(d / "pairs.jsonl", pref_rows(16, 0))
    train(train_cfg(llama_dir, data, d / "run", max_steps=1))
    return d / "run", data


def _nan_copy(run: Path, dest: Path) -> Path:
    """A copy of the run whose token embeddings are NaN (damaged weights)."""
    shutil.copytree(run, dest)
    w = load_file(str(dest / "model.safetensors"))
    w = {k: v * float("nan") if "embed_tokens" in k else v for k, v in w.items()}
    save_file(w, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _credit(capsys, model, *args):
    return run_cli(capsys, "credit", "--model", model, "--quiet", "--show", "0", *args)


def test_credit_and_generate_never_write_over_what_they_read(run_dir, tmp_path, capsys):
    run, data = run_dir
    victim = tmp_path / "victim.jsonl"
    shutil.copy(data, victim)
    before = victim.read_bytes()
    assert "is the --data file" in one_line_error(*_credit(capsys, run, "--data", victim, "--json", victim)[::2])
    assert "same file" in one_line_error(*_credit(capsys, run, "--data", victim, "--json", tmp_path / "o",
                                                  "--html", tmp_path / "o")[::2])
    model_copy = tmp_path / "m"
    shutil.copytree(run, model_copy)
    weights = (model_copy / "model.safetensors").read_bytes()
    code, _, err = _credit(capsys, model_copy, "--data", victim, "--json", model_copy / "model.safetensors")
    err = one_line_error(code, err)
    assert "a file of the --model directory" in err and "that loading it reads" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", run, "--prompts", prompts, "--out", prompts, "--quiet")
    assert "is the --prompts file" in one_line_error(code, err)
    assert victim.read_bytes() == before and prompts.read_text() == "the film\n"
    assert (model_copy / "model.safetensors").read_bytes() == weights
    # another file in the model's directory is not one loading reads: allowed, the second time too (it then exists)
    for _ in range(2):
        code, _, err = _credit(capsys, model_copy, "--prompt", "the film", "--response", " was good.", "--json",
                               model_copy / "credit.json")
        assert code == 0, err
    assert (model_copy / "credit.json").is_file()
    for name in ("config.json", "tokenizer.json", "r2q_config.json"):
        code, _, err = _credit(capsys, model_copy, "--prompt", "a", "--response", "b", "--json", model_copy / name)
        assert "that loading it reads" in one_line_error(code, err)


def test_a_model_inside_out_is_refused_before_overwrite_empties_it(run_dir, tmp_path, capsys):
    run, data = run_dir
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    start = out / "checkpoints" / "start"
    shutil.copytree(run, start)
    code, _, err = run_cli(capsys, "train", "--model", start, "--data", data, "--out", out, "--overwrite",
                           "--max-steps", "1", "--quiet", "--report-to", "none")
    assert "lies inside the checkpoints or adapter of --out" in one_line_error(code, err)
    assert (start / "model.safetensors").is_file()


def test_a_record_does_not_block_the_ref_and_beta_given(run_dir, llama_ref_dir, tmp_path, capsys):
    run, _ = run_dir
    args = ("--prompt", "the film", "--response", " was good.", "--json", tmp_path / "c.json")
    for bad, why in ((lambda r: dict(r, ref="somewhere/relative/x"), "relative path"),
                     (lambda r: dict(r, ref=5), "'ref' is 5, not a path"),
                     (lambda r: dict(r, beta="high"), "'beta' is 'high', not a number"),
                     (None, "damaged (not a JSON object)")):
        d = tmp_path / why.split()[0].strip("'")
        shutil.copytree(run, d)
        rec = json.loads((d / "r2q_config.json").read_text())
        (d / "r2q_config.json").write_text(json.dumps(bad(rec)) if bad else '{"model": ')
        assert why in one_line_error(*_credit(capsys, d, *args)[::2])  # without --ref / --beta: said
        code, _, err = _credit(capsys, d, *args, "--ref", llama_ref_dir, "--beta", "0.2")
        assert code == 0, err
        assert json.loads((tmp_path / "c.json").read_text())["beta"] == 0.2
    # a hub id recorded as the reference is not a relative path: the given --ref is used, the id only named
    d = tmp_path / "hub"
    shutil.copytree(run, d)
    rec = json.loads((d / "r2q_config.json").read_text())
    (d / "r2q_config.json").write_text(json.dumps(dict(rec, ref="EleutherAI/pythia-70m")))
    code, _, err = _credit(capsys, d, *args, "--ref", llama_ref_dir)
    assert code == 0, err


def test_credit_beta_zero_is_refused_not_replaced(run_dir, capsys):
    run, _ = run_dir
    err = one_line_error(*_credit(capsys, run, "--prompt", "a", "--response", "b", "--beta", "0")[::2])
    assert "--beta must be greater than 0" in err


def test_credit_takes_an_empty_response(run_dir, tmp_path, capsys):
    run, _ = run_dir
    code, _, err = _credit(capsys, run, "--prompt", "the film", "--response", "", "--json", tmp_path / "e.json")
    assert code == 0, err
    (item,) = json.loads((tmp_path / "e.json").read_text())["completions"]
    assert len(item["token_ids"]) == 1 and item["tokens"][0] == "<|endoftext|>"  # EOS alone
    assert "go together" in one_line_error(*_credit(capsys, run, "--response", "x")[::2])
    assert "go together" in one_line_error(*_credit(capsys, run, "--prompt", "x")[::2])


def test_a_scorer_that_cannot_take_prompts_and_completions_is_refused_before_decoding(run_dir, tmp_path, capsys):
    run, _ = run_dir
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", run, "--prompts", prompts, "--out", tmp_path / "g.jsonl",
                           "--method", "best-of-n", "--ranking", "external", "--scorer", "os:getcwd", "--quiet")
    assert "must take (prompts, completions)" in one_line_error(code, err)


def test_nan_weights_are_one_line_in_credit_and_generate(run_dir, tmp_path, capsys):
    run, _ = run_dir
    bad = _nan_copy(run, tmp_path / "nan")
    err = one_line_error(*_credit(capsys, bad, "--prompt", "the film", "--response", " was good.")[::2])
    assert "NaN log-probs" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", bad, "--prompts", prompts, "--out", tmp_path / "g.jsonl",
                           "--quiet")
    assert "NaN log-probs" in one_line_error(code, err)
    assert not (tmp_path / "g.jsonl").exists()


def test_pairs_the_cut_makes_identical_are_counted(tokenizer):
    from r2q.data import preference_examples_from_rows

    rows = [{"prompt": "the film", "chosen": " was good and long and fine", "rejected": " was good and long but bad"},
            {"prompt": "a", "chosen": " b", "rejected": " b"}]
    ex, report = preference_examples_from_rows(rows, tokenizer, max_length=5, max_prompt_length=2)
    assert ex[0].chosen_ids == ex[0].rejected_ids  # (the premise: cut to the same tokens)
    assert report.n_identical == 1 and report.n_identical_after_cut == 1
    assert "1 made identical by the cut" in report.summary()


@pytest.mark.parametrize("suffix, text", [(".yaml", "max_length: 64\nmax_length: 128\n"),
                                          (".json", '{"max_length": 64, "max_length": 128}'),
                                          (".yaml", "max_length: 64\nmax-length: 128\n")])
def test_a_config_key_given_twice_is_refused(run_dir, tmp_path, capsys, suffix, text):
    run, data = run_dir
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--model", run, "--data", data, "--out", tmp_path / "o")
    assert "twice" in one_line_error(code, err)


def test_a_training_run_that_fails_at_its_first_step_leaves_no_directory(run_dir, tmp_path, capsys):
    run, data = run_dir
    bad = _nan_copy(run, tmp_path / "nan")
    code, _, err = run_cli(capsys, "train", "--model", bad, "--ref", run, "--data", data, "--out", tmp_path / "o",
                           "--max-steps", "1", "--quiet", "--report-to", "none", "--cache-dir", tmp_path / "cache")
    assert "non-finite loss at step 1" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_paths_and_data_sets_that_do_not_load_say_why_in_one_line(run_dir, tmp_path, capsys):
    run, data = run_dir
    code, _, err = run_cli(capsys, "inspect-data", data, "--model", "no-such-model", "--max-length", "16",
                           "--max-prompt-length", "16")
    assert "--max-prompt-length (16) must be less than --max-length (16)" in one_line_error(code, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "inspect-data", data, "--model", empty)
    assert "no tokenizer files in it" in one_line_error(code, err)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text('["a", "b"]\n{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    code, _, err = run_cli(capsys, "train", "--model", run, "--data", ds, "--out", tmp_path / "o", "--quiet",
                           "--report-to", "none")
    line = one_line_error(code, err)  # (no progress bar or log line of datasets' beside it)
    assert "cannot load this data set" in line and "(" in line.split("DatasetGenerationError")[-1]


def test_generate_notes_around_a_damaged_record_when_ref_is_given(run_dir, llama_ref_dir, tmp_path, capsys):
    run, _ = run_dir
    d = tmp_path / "m"
    shutil.copytree(run, d)
    rec = json.loads((d / "r2q_config.json").read_text())
    (d / "r2q_config.json").write_text(json.dumps(dict(rec, beta="high")))
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", d, "--prompts", prompts, "--out", tmp_path / "g.jsonl",
                           "--ref", llama_ref_dir, "--method", "reward-beam", "--max-new-tokens", "3", "--quiet")
    assert code == 0, err
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 1


def test_outputs_are_where_the_write_lands_links_included(run_dir, tmp_path, capsys):
    """A write replaces a link at its path (never follows it): a model directory of links (the hub cache's layout)
    is protected by its names, and a link to the data is not the data."""
    run, data = run_dir
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    shutil.copytree(run, blobs)
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    code, _, err = _credit(capsys, snap, "--prompt", "a", "--response", "b", "--json", snap / "config.json")
    assert "that loading it reads" in one_line_error(code, err)
    assert (snap / "config.json").is_symlink()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    before = data.read_bytes()
    code, _, err = _credit(capsys, run, "--data", data, "--json", link)
    assert code == 0, err
    assert data.read_bytes() == before and not link.is_symlink() and json.loads(link.read_text())["kind"]


def test_an_older_records_relative_reference_with_one_slash_is_not_taken_for_a_hub_id(run_dir, tmp_path, capsys):
    run, _ = run_dir
    d = tmp_path / "old"
    shutil.copytree(run, d)
    rec = json.loads((d / "r2q_config.json").read_text())
    (d / "r2q_config.json").write_text(json.dumps(dict(rec, ref="runs/sft", out="runs/old")))  # as older r2q wrote
    code, _, err = _credit(capsys, d, "--prompt", "a", "--response", "b")
    assert "relative path 'runs/sft'" in one_line_error(code, err)


def test_a_model_elsewhere_under_out_is_allowed(tmp_path):
    from r2q.errors import UserError
    from r2q.train.rundir import check_not_in_place

    out = tmp_path / "exp"
    for sub in ("sft", "checkpoints/step-1", "adapter/x"):
        (out / sub).mkdir(parents=True)
    check_not_in_place(out, str(out / "sft"), "")  # the run touches only its files, checkpoints/ and adapter/
    for sub in ("checkpoints/step-1", "adapter/x"):
        with pytest.raises(UserError, match="lies inside the checkpoints or adapter"):
            check_not_in_place(out, str(out / sub), "")
        with pytest.raises(UserError, match="--ref"):
            check_not_in_place(out, "", str(out / sub))


def test_yaml_merge_keys_still_load(tmp_path):
    from r2q.config import read_config_file
    from r2q.train import TrainConfig

    f = tmp_path / "m.yaml"
    f.write_text("lr: 1.0e-5\n<<: {beta: 0.2, max_length: 64}\n"
                 "max_length: 128\n")
    assert read_config_file(str(f), TrainConfig) == {"lr": 1.0e-5, "beta": 0.2, "max_length": 128}


def test_a_lora_adapters_base_is_protected_as_the_model_is(tmp_path):
    from r2q.errors import UserError
    from r2q.paths import check_outputs_spare_inputs

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    with pytest.raises(UserError, match="--model's base model directory"):
        check_outputs_spare_inputs([("--json", base / "model.safetensors")], [], [("--model", str(adapter))])
    check_outputs_spare_inputs([("--json", base / "credit.json")], [], [("--model", str(adapter))])
    assert (base / "model.safetensors").read_bytes() == b"weights"


# ------------------------------------------------------------------ the Python API (second audit, 2026-12-07)


def test_config_values_of_the_wrong_type_are_refused_not_coerced():
    from r2q.search import GenerateConfig
    from r2q.train import TrainConfig

    with pytest.raises(UserError, match=r"^--num-beams must be an integer; got str '4'$"):
        GenerateConfig(num_beams="4")
    with pytest.raises(UserError, match="^--share-prefix must be true or false; got str 'false'$"):
        TrainConfig(share_prefix="false")  # a non-empty string is true: it would have turned sharing on
    with pytest.raises(UserError, match="^--lr must be a number; got bool True$"):
        TrainConfig(lr=True)
    # what a config file also accepts: an int for a float, an integral float for an int
    assert type(TrainConfig(beta=1).beta) is float and TrainConfig(beta=1).beta == 1.0
    assert type(GenerateConfig(num_beams=8.0).num_beams) is int and GenerateConfig(num_beams=8.0).num_beams == 8
    with pytest.raises(UserError, match="--num-beams must be an integer; got float 2.5"):
        GenerateConfig(num_beams=2.5)
    with pytest.raises(UserError, match="--delimiter is empty: --ranking reward-min cuts steps at it"):
        GenerateConfig(method="best-of-n", ranking="reward-min", delimiter="")


def test_generate_refuses_prompts_that_are_not_a_list_of_prompts(llama_dir, tokenizer):
    from r2q.models import load_model
    from r2q.search import GenerateConfig, generate, generate_ids
    from r2q.toy import tiny_model

    policy, cfg = load_model(llama_dir), GenerateConfig(method="greedy", max_new_tokens=2)
    with pytest.raises(UserError, match=r"^prompts must be a list, not one string: wrap it in a list, \['Hello'\]$"):
        generate(policy, tokenizer, "Hello", cfg)
    with pytest.raises(UserError, match="^no prompts: the list is empty$"):
        generate(policy, tokenizer, [], cfg)
    with pytest.raises(UserError, match="^policy must be a loaded model, not the path"):
        generate(str(llama_dir), tokenizer, ["Hello"], cfg)
    with pytest.raises(UserError, match="^ref must be a loaded model"):
        generate(policy, tokenizer, ["Hello"], GenerateConfig(method="reward-beam", max_new_tokens=2), ref=llama_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    V = policy.get_output_embeddings().weight.shape[0]
    for prompts, why in (([[3, 4], [5, V]], f"^prompt 2 holds token id {V}, outside the model's vocabulary "
                                            rf"\(0..{V - 1}\)$"),
                         ([[3, -1]], r"^prompt 1 holds a negative token id \(-1\)$"),
                         ([3, 4, 5], "^prompt 1 must be a list of token ids; got int"),
                         ([[]], r"^prompt 1 is empty: decoding starts from at least one token \(BOS\)$"),
                         ([[1.0, 2.0]], "^prompt 1 must hold integer token ids; got torch.float32$")):
        with pytest.raises(UserError, match=why):
            generate_ids(policy, prompts, cfg, [eos], pad)
    small = tiny_model("llama", len(tokenizer) - 10)  # a model whose vocabulary the tokenizer overruns
    with pytest.raises(UserError, match=f"^the tokenizer has {len(tokenizer)} tokens but the policy's output layer "
                                        f"only {len(tokenizer) - 10}$"):
        generate(small, tokenizer, ["Hello"], cfg)
    with pytest.raises(UserError, match="token-level rewards need one shared vocabulary"):
        generate(policy, tokenizer, ["Hello"], GenerateConfig(method="reward-beam", max_new_tokens=2),
                 ref=tiny_model("llama", len(tokenizer) + 6))


def test_the_credit_api_refuses_bad_arguments_before_scoring(llama_dir, tokenizer):
    from r2q.credit import score_examples, score_pairs, score_texts
    from r2q.data import preference_examples_from_rows
    from r2q.models import load_model
    from r2q.toy import tiny_model

    policy = load_model(llama_dir)
    with pytest.raises(UserError, match=r"^prompts must be a list, not one string"):
        score_texts(policy, None, tokenizer, "a prompt", ["a completion"], 0.1)
    with pytest.raises(UserError, match="^rows must be a list; got dict$"):
        score_pairs(policy, None, tokenizer, {"prompt": "p", "chosen": "a", "rejected": "b"}, 0.1)
    examples, _ = preference_examples_from_rows(pref_rows(2, 0), tokenizer, 128, 64)
    for beta in (float("nan"), float("inf"), 0, -1.0):
        with pytest.raises(UserError, match="^beta must be a positive finite number; got"):
            score_examples(policy, None, tokenizer, examples, beta)
    with pytest.raises(UserError, match="^batch_size must be a positive integer; got 0$"):
        score_examples(policy, None, tokenizer, examples, 0.1, batch_size=0)
    with pytest.raises(UserError, match="token-level rewards need one shared vocabulary"):
        score_examples(policy, tiny_model("llama", len(tokenizer) + 6), tokenizer, examples, 0.1, use_cache=False)
    with pytest.raises(UserError, match=f"^ref must be a loaded model, not the path '{llama_dir}': load it first"):
        score_examples(policy, str(llama_dir), tokenizer, examples, 0.1)
    with pytest.raises(UserError, match="^policy must be a loaded model, not the path"):
        score_texts(llama_dir, None, tokenizer, ["a prompt"], ["a completion"], 0.1)
    report = score_examples(policy, None, tokenizer, examples, 0.1)  # and good arguments still score
    assert len(report.items()) == 4


def test_train_refuses_an_unknown_mode_and_the_policy_as_its_own_reference(llama_dir, tokenizer, tmp_path):
    from r2q.models import load_model

    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(4, 0))
    with pytest.raises(UserError, match="^mode must be 'dpo' or 'sft'; got 'ppo'$"):
        train(train_cfg(llama_dir, data, tmp_path / "a", max_steps=1), mode="ppo")
    policy = load_model(llama_dir)
    before = {k: v.requires_grad for k, v in policy.named_parameters()}
    with pytest.raises(UserError, match="^ref_model is the policy itself"):
        train(train_cfg(llama_dir, data, tmp_path / "b", max_steps=1), model=policy, tokenizer=tokenizer,
              ref_model=policy)
    assert {k: v.requires_grad for k, v in policy.named_parameters()} == before  # nothing frozen
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_loss_and_step_functions_refuse_arguments_they_would_misread():
    import torch

    from r2q.losses import dpo_loss
    from r2q.rewards import step_ends_from_text

    w, lo = torch.tensor([1.0]), torch.tensor([0.5])
    with pytest.raises(ValueError, match="label_smoothing is for loss_type='cdpo', not 'ipo'"):
        dpo_loss(w, lo, 0.1, "ipo", label_smoothing=0.1)  # was silently ignored
    with pytest.raises(ValueError, match="beta must be a positive finite number; got 0"):
        dpo_loss(w, lo, 0, "ipo")  # was a division by zero (inf loss)
    assert dpo_loss(w, lo, 0.1, "ipo").item() == pytest.approx((0.5 / 0.1 - 1 / 0.2) ** 2)
    with pytest.raises(ValueError, match="pieces is a list of sequences"):
        step_ends_from_text(["a\n", "b"])  # one sequence given bare: its strings would be read as token lists
    with pytest.raises(ValueError, match="delimiter must be a non-empty string"):
        step_ends_from_text([["a", "b"]], "")
    assert step_ends_from_text([["a\n", "b"]]).tolist() == [[True, False]]


def test_credit_callback_checks_its_settings_when_made():
    from types import SimpleNamespace

    from r2q.integrations.trl import CreditCallback

    trainer = SimpleNamespace(args=SimpleNamespace(beta=0.1, output_dir="unused"))
    with pytest.raises(UserError, match="^every must be a positive integer \\(steps\\); got 2.5$"):
        CreditCallback(trainer, rows=pref_rows(1, 0), every=2.5)
    with pytest.raises(UserError, match="^beta must be a positive finite number; got nan$"):
        CreditCallback(SimpleNamespace(args=SimpleNamespace(beta=float("nan"), output_dir="unused")),
                       rows=pref_rows(1, 0))

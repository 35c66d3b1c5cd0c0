"""Options that the command would ignore, or that contradict each other, given what else is set: one line (exit 2)
naming the option, before anything is loaded, and nothing written. At their defaults they are never in the way, and
the Python API warns (as transformers warns of a temperature given to greedy decoding) instead of refusing."""

import warnings

import pytest
from conftest import one_line_error, pref_rows, run_cli, write_jsonl

from r2q.search.config import USED_BY, GenerateConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("combos")
    (d / "p.txt").write_text("the film\n")
    return write_jsonl(d / "pairs.jsonl", pref_rows(8, 0)), d / "p.txt"


@pytest.mark.parametrize("args, problem", [
    (["--method", "beam", "--temperature", "0.7"], "--temperature is not used by --method beam"),
    (["--method", "beam", "--top-k", "5"], "--top-k is not used by --method beam"),
    (["--method", "greedy", "--num-beams", "8"], "--num-beams is not used by --method greedy"),
    (["--method", "greedy", "--do-sample"], "--do-sample is not used by --method greedy"),
    (["--method", "sample", "--length-penalty", "1"], "--length-penalty is not used by --method sample"),
    (["--method", "beam", "--simulations", "8"], "--simulations is not used by --method beam"),
    (["--method", "best-of-n", "--chunk-len", "4"], "--chunk-len is not used by --method best-of-n"),
    (["--method", "greedy", "--ranking", "likelihood"], "--ranking is not used by --method greedy"),
    (["--method", "guided", "--ref", "R", "--top-p", "0.9"], "guided takes the argmax unless --do-sample"),
    (["--method", "sample", "--delimiter", "x"], "--delimiter cuts completions into steps"),
    (["--method", "best-of-n", "--delimiter", "x"], "--delimiter cuts completions into steps"),
])
def test_generate_refuses_options_its_method_ignores(files, llama_dir, tmp_path, capsys, args, problem):
    _, prompts = files
    args = [llama_dir if a == "R" else a for a in args]
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", prompts, "--out", out, *args)
    assert problem in one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--method", "sample", "--temperature", "0.7", "--top-k", "5"],
    ["--method", "beam", "--num-beams", "2", "--length-penalty", "1", "--early-stopping", "true"],
    ["--method", "guided", "--ref", "R", "--do-sample", "--temperature", "0.5", "--alpha", "2"],
    ["--method", "best-of-n", "--ref", "R", "--ranking", "reward-min", "--delimiter", " ", "--num-samples", "2"],
    ["--method", "mcts", "--simulations", "4", "--rollout-len", "2", "--ref-term", "--backup", "mean"],
    ["--method", "greedy", "--num-beams", "4", "--temperature", "1.0"],  # at their defaults: not "given"
])
def test_options_a_method_reads_are_accepted(files, llama_dir, tmp_path, capsys, args):
    _, prompts = files
    args = [llama_dir if a == "R" else a for a in args]
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", prompts, "--out", tmp_path / "o",
                           "--max-new-tokens", "3", "--quiet", *args)
    assert code == 0, err


def test_every_method_specific_option_is_read_by_its_methods():
    """USED_BY names methods that exist, and each option it lists is a GenerateConfig field."""
    from r2q.search.config import METHODS

    names = set(GenerateConfig.__dataclass_fields__)
    assert set(USED_BY) <= names
    assert all(set(m) <= set(METHODS) and m for m in USED_BY.values())


def test_the_python_api_warns_instead():
    with pytest.warns(UserWarning, match="--temperature is not used by --method beam"):
        cfg = GenerateConfig(method="beam", temperature=0.7)
    assert cfg.temperature == 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerateConfig(method="sample", temperature=0.7)


@pytest.mark.parametrize("command, args, problem", [
    ("train", ["--ref", "none", "--precompute-ref"], "--precompute-ref caches the reference's log-probs"),
    ("train", ["--eval-data", "D", "--eval-fraction", "0.2"], "--eval-data and --eval-fraction both choose"),
    ("train", ["--eval-split", "validation"], "--eval-split chooses within --eval-data, which is not given"),
    ("train", ["--split", "test"], "--split chooses within a data set"),
    ("sft", ["--subset", "plain"], "--subset chooses within a data set"),
    ("train", ["--eval-data", "D", "--eval-split", "validation"], "--eval-split chooses within a data set"),
])
def test_train_refuses_options_that_would_be_ignored(files, llama_dir, tmp_path, capsys, command, args, problem):
    data, _ = files
    args = [data if a == "D" else a for a in args]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, command, "--model", llama_dir, "--data", data, "--out", out, "--quiet", *args)
    assert problem in one_line_error(code, err)
    assert not out.exists()


def test_credit_refuses_a_split_of_a_file(files, llama_dir, capsys):
    data, _ = files
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_dir, "--data", data, "--split",
                           "test")
    assert "--split chooses within a data set" in one_line_error(code, err)


def test_warmup_longer_than_the_run_is_said(files, llama_dir, tmp_path, capsys):
    """As in transformers, a warm-up past the run's end is allowed (the rate stops short of --lr), and said."""
    data, _ = files
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "a", "--quiet",
                           "--max-steps", "2", "--warmup-steps", "2", "--batch-size", "4")
    assert code == 0 and "warmup" not in err, err
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "b", "--quiet",
                           "--max-steps", "2", "--warmup-steps", "5", "--batch-size", "4")
    assert code == 0, err
    assert "--warmup-steps 5 is more than the run's 2 steps: the learning rate stops at 0.4 of --lr" in err

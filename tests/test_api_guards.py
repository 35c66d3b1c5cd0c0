"""What a second audit (2026-12-08) found in credit, generate, the reward helpers and the theory API: a best-of-n
ranking that needs a reference found out only after sampling, a missing --ref found after the policy loaded, an
empty --prompt taken for a missing one, a --response cut without a word, and Python arguments of the wrong type or
value that gave raw errors (or NaN) instead of naming the argument. Python gets ValueError / TypeError subclasses;
the CLI one line, exit 2."""

import json
import math

import pytest
import torch
from conftest import one_line_error, run_cli

from r2q.errors import UserError, UserTypeError


@pytest.fixture(scope="module")
def loaded(llama_dir, llama_ref_dir):
    from r2q.models import load_model, load_tokenizer

    return load_model(llama_dir).eval(), load_model(llama_ref_dir).eval(), load_tokenizer(llama_dir)


def test_a_user_error_is_a_value_error_and_a_wrong_type_a_type_error():
    assert issubclass(UserError, ValueError) and issubclass(UserTypeError, TypeError)
    assert issubclass(UserTypeError, UserError)  # the CLI prints either in one line


@pytest.mark.parametrize("ranking", ["reward", "reward-min", "reward-last"])
def test_best_of_n_by_reward_without_a_reference_is_refused_before_anything_loads(tmp_path, capsys, loaded,
                                                                                  ranking):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    # a model path that does not exist: the refusal comes before any path is even looked at
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "nowhere", "--prompts", prompts, "--out",
                           tmp_path / "o.jsonl", "--method", "best-of-n", "--ranking", ranking, "--quiet")
    assert f"best-of-n ranks by {ranking}, which needs a reference model (--ref)" in one_line_error(code, err)
    from r2q.search import GenerateConfig, generate

    policy, _, tok = loaded
    calls = []
    hook = policy.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UserError, match="needs a reference model"):
            generate(policy, tok, ["the film"], GenerateConfig(method="best-of-n", ranking=ranking))
    finally:
        hook.remove()
    assert calls == []  # not one forward (it used to sample every prompt first)


def test_generate_checks_every_model_path_before_loading_any(llama_dir, tmp_path, capsys):
    """A missing --ref is named at once, not after the policy has loaded: the policy here has damaged weights, so
    loading it first would have failed on them instead."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", broken, "--ref", tmp_path / "no-ref", "--prompts", prompts,
                           "--out", tmp_path / "o.jsonl", "--method", "reward-beam", "--quiet")
    assert "no-ref: no such reference directory" in one_line_error(code, err)


def test_credit_takes_an_empty_prompt_and_names_the_half_missing(llama_dir, llama_ref_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--prompt", "",
                           "--response", "the film was good", "--json", out, "--quiet", "--show", "0")
    assert code == 0, err
    assert len(json.loads(out.read_text())["completions"]) == 1
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--response", "good")
    assert "--response is given without --prompt: they go together" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--prompt", "a")
    assert "--prompt is given without --response" in one_line_error(code, err)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--data", data,
                           "--prompt", "")
    assert "give either --data FILE or --prompt TEXT" in one_line_error(code, err)


def test_credit_says_when_it_cuts_the_response_given(llama_dir, llama_ref_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    code, _, err = run_cli(capsys, "credit", "--model", llama_dir, "--ref", llama_ref_dir, "--prompt", "the film",
                           "--response", "the movie was great " * 20, "--max-length", "24", "--max-prompt-length",
                           "8", "--json", out, "--quiet", "--show", "0")
    assert code == 0, err
    assert "1 rows with a truncated completion" in err
    assert len(json.loads(out.read_text())["completions"][0]["token_ids"]) <= 24


def _tok_str(m, r, t):
    from r2q.credit import score_texts

    return score_texts(m, r, "some/path", ["a"], ["b"], 0.1)


def _tok_none(m, r, t):
    from r2q.credit import score_texts

    return score_texts(m, r, None, ["a"], ["b"], 0.1)


def _max_length_str(m, r, t):
    from r2q.credit import score_texts

    return score_texts(m, r, t, ["a"], ["b"], 0.1, max_length="10")


def _delimiter_int(m, r, t):
    from r2q.credit import score_texts

    return score_texts(m, r, t, ["a"], ["b"], 0.1, delimiter=5)


def _path_int(m, r, t):
    from r2q.credit import credit_from_file

    return credit_from_file(m, r, t, 123, 0.1)


def _cfg_dict(m, r, t):
    from r2q.search import generate

    return generate(m, t, ["a"], {"method": "greedy"})


def _gen_tok_str(m, r, t):
    from r2q.search import GenerateConfig, generate

    return generate(m, "some/path", ["a"], GenerateConfig(method="greedy"))


def _eos_int(m, r, t):
    from r2q.search import GenerateConfig
    from r2q.search.decode import generate_ids

    return generate_ids(m, [[5, 6]], GenerateConfig(method="greedy"), 0, 0)


def _pad_str(m, r, t):
    from r2q.search import GenerateConfig
    from r2q.search.decode import generate_ids

    return generate_ids(m, [[5, 6]], GenerateConfig(method="greedy"), [0], "0")


@pytest.mark.parametrize("call, names", [(_tok_str, "tokenizer must be a loaded tokenizer, not the path"),
                                         (_tok_none, "tokenizer must be a loaded tokenizer"),
                                         (_max_length_str, "max_length must be a positive integer"),
                                         (_delimiter_int, "delimiter must be a string"),
                                         (_path_int, "path must be a data file"),
                                         (_cfg_dict, "cfg must be a GenerateConfig"),
                                         (_gen_tok_str, "tokenizer must be a loaded tokenizer"),
                                         (_eos_int, "eos_ids must be a list of token ids"),
                                         (_pad_str, "pad_id must be a token id")])
def test_an_argument_of_the_wrong_type_is_a_type_error_naming_it(loaded, call, names):
    with pytest.raises(TypeError, match=names):
        call(*loaded)


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), 0.0, -1.0, "0.1", None, True])
def test_the_reward_helpers_refuse_a_beta_that_is_not_a_positive_number(beta):
    from r2q import implicit_rewards, token_rewards
    from r2q.rewards import kl_ref_pi

    lp, rl = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    for f in (lambda: token_rewards(lp, rl, beta), lambda: implicit_rewards(lp, rl, torch.ones(1, 2).bool(), beta),
              lambda: kl_ref_pi(lp, beta)):
        with pytest.raises(UserError, match="beta must be a positive finite number"):
            f()


def test_the_reward_helpers_take_any_real_beta():
    import numpy as np

    from r2q import token_rewards

    lp, rl = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    for beta in (1, 0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(token_rewards(lp, rl, beta), float(beta) * (lp - rl))
    assert token_rewards(-1.0, -1.5, 0.5) == pytest.approx(0.25)


def test_guided_decoding_checks_alpha_and_alpha_zero_is_the_base_model():
    from r2q import guided_logps

    g = torch.Generator().manual_seed(0)
    base, tuned, ref = (torch.log_softmax(torch.randn(3, 7, generator=g), -1) for _ in range(3))
    tuned[0, 2] = float("-inf")  # a token the tuned model rules out: alpha 0 must still give the base's log-probs
    assert torch.equal(guided_logps(base, tuned, ref, 0.0), torch.log_softmax(base, -1))
    for alpha in (float("nan"), float("inf"), -0.5, "1"):
        with pytest.raises(UserError, match="alpha must be a non-negative finite number"):
            guided_logps(base, tuned, ref, alpha)


def test_the_theory_api_names_its_bad_arguments():
    from r2q.theory.mdp import build_tree, random_mdp, soft_value_iteration

    for args, what in (((2.5, 3, 1), "n_tokens"), (("3", 3, 1), "n_tokens"), ((3, 0, 1), "horizon"),
                       ((3, 3, math.nan), "n_prompts")):
        with pytest.raises(UserError, match=f"{what} must be a positive integer"):
            build_tree(*args)
    for kw, what in ((dict(beta=math.nan), "beta"), (dict(beta=0.0), "beta"), (dict(beta="0.5"), "beta"),
                     (dict(ref_scale=math.nan), "ref_scale"), (dict(reward_scale=-1.0), "reward_scale"),
                     (dict(seed="0"), "seed"), (dict(seed=-1), "seed")):
        with pytest.raises(UserError, match=what):
            random_mdp(**kw)
    mdp = random_mdp()
    with pytest.raises(UserError, match="beta must be a positive finite number"):
        soft_value_iteration(mdp.tree, mdp.reward, mdp.ref_logp, math.nan)


def test_theory_run_names_a_seed_of_the_wrong_type(tmp_path):
    from r2q.theory import run

    with pytest.raises(UserTypeError, match="--seed must be an integer"):
        run(tmp_path / "t", seed="0")
    assert not (tmp_path / "t").exists()


def test_generate_with_a_tokenizer_without_eos_names_it(loaded):
    import copy

    from r2q.search import GenerateConfig, generate

    policy, _, tok = loaded
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(UserError, match="the tokenizer has no EOS token"):
        generate(policy, no_eos, ["the film"], GenerateConfig(method="greedy"))


def test_lengths_may_be_numpy_integers(loaded):
    import numpy as np

    from r2q.data import sft_examples_from_rows

    _, _, tok = loaded
    ex, _ = sft_examples_from_rows([{"prompt": "a", "completion": "b"}], tok, np.int64(64), np.int64(8))
    assert len(ex) == 1

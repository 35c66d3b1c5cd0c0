"""The paper's identities on an exact token-level tree MDP (r2q.theory), and the arithmetic task's rows.

Exact cases are asserted to 1e-6 or tighter (float64); sampled and neural cases by the thresholds stated in
each test. Every DPO fit goes through r2q's own implicit_rewards / sequence_rewards / dpo_loss.
"""

import json
import random

import pytest
import torch

from r2q.tasks import arithmetic
from r2q.theory import check_search, exhaustive_search, greedy_search, run
from r2q.theory.checks import (
    check_argmax,
    check_sampled,
    check_transformer,
    default_mdp,
    falling_run,
    scored_pairs,
)
from r2q.theory.dpo import exact_pairs, fit_tabular, implicit_sequence_rewards
from r2q.theory.mdp import (
    EOS,
    build_tree,
    kl_by_states,
    log_policy,
    occupancy,
    sequence_logps,
    tilted_sequence_logps,
    tv_distance,
)

EXACT = 1e-6


@pytest.fixture(scope="module")
def mdp():
    return default_mdp(0)


@pytest.fixture(scope="module")
def dpo_fit(mdp):
    """Infinite-data DPO optimum of the tabular policy."""
    R = mdp.true_returns()
    return fit_tabular(mdp, exact_pairs(mdp.tree, sequence_logps(mdp.tree, mdp.ref_logp), R))


def test_tree_enumerates_every_completion_once():
    tree = build_tree(n_tokens=3, horizon=4, n_prompts=2)
    assert tree.per_prompt == 1 + 3 + 9 + 27 and tree.num_states == 80
    seen = set()
    for j in range(tree.num_states):
        toks = tree.tokens(j)
        assert toks[-1] == EOS and EOS not in toks[:-1] and len(toks) <= 4
        p = int(tree.prompt[j])
        assert tree.index(p, toks) == j
        seen.add((p, toks))
        for t in range(len(toks) - 1):  # the path follows the transitions
            assert tree.seq_state[j, t + 1] == tree.child[tree.seq_state[j, t], toks[t]]
    assert len(seen) == tree.num_states
    assert not tree.allowed[tree.depth == 3, 1:].any()  # the horizon forces EOS
    with pytest.raises(KeyError):
        tree.index(0, (1, 1, 1, 1, EOS))


def test_enumeration_is_a_distribution_and_occupancy_agrees(mdp):
    tree = mdp.tree
    logp = log_policy(tree, torch.randn(tree.num_states, tree.vocab, dtype=torch.float64))
    seq = sequence_logps(tree, logp)
    torch.testing.assert_close(tree.blocks(seq.exp()).sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    # the probability of reaching state j is the prefix probability: sequence j without its EOS
    torch.testing.assert_close(occupancy(tree, logp).log(), seq - logp[:, EOS], rtol=0, atol=1e-12)


def test_soft_value_iteration_solves_the_kl_regularised_objective(mdp):
    """pi* from the Bellman sweep equals pi_ref exp(R/beta)/Z; J(pi) = E_pi R - beta KL(pi||pi_ref) is V*(s0) at
    pi* and lower at any other policy."""
    tree, sol, R = mdp.tree, mdp.solve(), mdp.true_returns()
    ref_seq, star_seq = sequence_logps(tree, mdp.ref_logp), sequence_logps(tree, sol.logp)
    assert (star_seq - tilted_sequence_logps(tree, ref_seq, R, mdp.beta)).abs().max() < 1e-12
    roots = torch.arange(tree.n_prompts) * tree.per_prompt

    def J(logp):
        seq = sequence_logps(tree, logp)
        return tree.blocks(seq.exp() * R).sum(-1) - mdp.beta * kl_by_states(tree, logp, mdp.ref_logp)

    assert (J(sol.logp) - sol.V[roots]).abs().max() < 1e-12
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = log_policy(tree, sol.logp.masked_fill(~tree.allowed, 0.0)
                           + 0.3 * torch.randn(sol.logp.shape, generator=g, dtype=torch.float64))
        assert (J(other) < sol.V[roots] - 1e-6).all()
    # the per-token form (Eq. 10) and V* = 0 after EOS
    imp = (mdp.beta * (sol.logp - mdp.ref_logp)).masked_fill(~tree.allowed, 0.0)
    assert (imp - sol.shaped).abs().max() < 1e-12


def test_exact_preferences_dpo_optimum_is_pi_star(mdp, dpo_fit):
    tree, sol = mdp.tree, mdp.solve()
    logp, info = dpo_fit
    tv = tv_distance(tree, sequence_logps(tree, logp), sequence_logps(tree, sol.logp))
    assert tv.max() < EXACT
    assert tv_distance(tree, sequence_logps(tree, mdp.ref_logp), sequence_logps(tree, sol.logp)).min() > 0.2
    assert info["grad_max"] < 1e-10


def test_exact_preferences_token_rewards_are_the_shaped_reward(mdp, dpo_fit):
    """beta log pi/pi_ref (a, s) = r(s,a) + V*(s') - V*(s) for every (s, a): Eq. 10 of the DPO optimum."""
    tree, sol = mdp.tree, mdp.solve()
    logp, _ = dpo_fit
    imp = (mdp.beta * (logp - mdp.ref_logp)).masked_fill(~tree.allowed, 0.0)
    assert (imp - sol.shaped)[tree.allowed].abs().max() < EXACT
    # shaping is not a no-op here: the raw reward is far from the implicit one
    assert (imp - mdp.reward)[scored_pairs(tree)].abs().max() > 0.5


def test_wrong_labels_do_not_reach_pi_star(mdp):
    """Control: the same fit on reversed Bradley-Terry labels lands far from pi* (the checks can fail)."""
    tree, R = mdp.tree, mdp.true_returns()
    logp, _ = fit_tabular(mdp, exact_pairs(tree, sequence_logps(tree, mdp.ref_logp), -R))
    assert tv_distance(tree, sequence_logps(tree, logp), sequence_logps(tree, mdp.solve().logp)).max() > 0.5


def test_sampled_preferences_recover_the_shaped_reward(mdp):
    """N in (100, 1000, 10000) pairs from pi_ref: weighted correlation with the shaped reward > 0.9 at N = 10000,
    RMSE falls with each tenfold N, and the shaped reward fits better than the raw one by > 0.15."""
    res = check_sampled(mdp, (100, 1000, 10000), repeats=1, seed=0)
    per = res.numbers["per_n"]
    assert per[-1]["corr"] > 0.9
    assert per[-1]["corr"] > per[-1]["corr_raw"] + 0.15
    assert all(a["rmse"] > b["rmse"] for a, b in zip(per, per[1:]))
    assert all(a["tv"] > b["tv"] for a, b in zip(per, per[1:]))
    assert res.passed


def test_transformer_dpo_approaches_pi_star(mdp):
    """A tiny Llama trained by DPO through build_batch/completion_logps: 300 steps bring TV(pi, pi*) below a
    quarter of TV(pi_ref, pi*) and the token rewards correlate > 0.9 with the shaped reward. The fp32 token path
    agrees with the per-state tables to 1e-5."""
    res = check_transformer(mdp, steps=300, lr=5e-3, seed=0)
    n = res.numbers
    assert n["token_path_err"] < 1e-5 and n["prob_mass_err"] < 1e-5
    assert n["tv_final"] < 0.25 * n["tv_ref_star"]
    assert n["token_corr"] > 0.9
    # r2q's beam search, reward-beam with the reference term, and MCTS on the trained transformer all find
    # the exhaustive argmax of log pi_theta = sum_t r_theta + beta log pi_ref (up to V*(s0))
    assert n["searches"] == {"beam": True, "reward-beam + beta log pi_ref": True, "mcts": True}
    assert res.passed


def test_argmax_of_reward_plus_reference_is_argmax_of_pi_star(mdp, dpo_fit):
    res = check_argmax(mdp, dpo_fit[0])
    assert res.numbers["identity_err"] < 1e-9
    ok = {s["name"]: s["all_ok"] for s in res.numbers["searches"]}
    assert ok["argmax R + beta log pi_ref"] and ok["argmax sum r_theta + beta log pi_ref"]
    assert min(res.numbers["log_gap_top2"]) > 0.1  # no near-tie that could make the match luck
    assert res.passed


def test_check_search_hook(mdp, dpo_fit):
    """The hook r2q.search will plug into: exhaustive search passes, searches that miss are reported."""
    tree = mdp.tree
    ref_seq = sequence_logps(tree, mdp.ref_logp)
    dpo_score = implicit_sequence_rewards(tree, dpo_fit[0], mdp.ref_logp, mdp.beta) + mdp.beta * ref_seq
    star_seq = sequence_logps(tree, mdp.solve().logp)
    good = check_search(exhaustive_search(tree, dpo_score), tree, star_seq)
    assert good["all_ok"] and all(r["regret"] == 0 for r in good["rows"])
    bad = check_search(greedy_search(tree, mdp.ref_logp), tree, star_seq)
    assert not bad["all_ok"] and max(r["regret"] for r in bad["rows"]) > 1.0
    invalid = check_search(lambda p: (1, EOS, EOS), tree, star_seq)
    assert not invalid["all_ok"] and invalid["rows"][0]["regret"] == float("inf")


def test_expected_implicit_reward_is_minus_beta_kl_and_rewards_fall(mdp):
    """E_{y~pi_ref}[R_theta(y)] = -beta KL(pi_ref || pi_theta) at every step of a DPO run (1e-9); with data from
    pi_ref the chosen and rejected implicit rewards both end below 0 (rejected lower, falling at every step);
    with data from pi* (off the reference) the chosen reward ends above 0."""
    tree = mdp.tree
    on = falling_run(mdp, sequence_logps(tree, mdp.ref_logp), steps=150, lr=0.05)
    off = falling_run(mdp, sequence_logps(tree, mdp.solve().logp), steps=150, lr=0.05)
    for o in (on, off):
        assert max(abs(a - b) for a, b in zip(o["e_ref"], o["neg_beta_kl"])) < 1e-9
        assert max(o["e_ref"]) <= 1e-12 and o["e_ref"][-1] < -0.1
    assert on["chosen"][-1] < -0.1 and on["rejected"][-1] < on["chosen"][-1] - 0.5
    assert all(b < a for a, b in zip(on["rejected"], on["rejected"][1:]))
    assert off["chosen"][-1] > 0.1
    assert on["tv"][-1] < 0.5 * on["tv"][0]


def test_arithmetic_solution_format():
    assert arithmetic.prompt_text(17, 25) == "17+25="
    assert arithmetic.solution(17, 25) == "7+5=12\n1+2+1=4\n42"
    assert arithmetic.solution(7, 25) == "7+5=12\n0+2+1=3\n32"
    assert arithmetic.solution(99, 99) == "9+9=18\n9+9+1=19\n198"
    assert arithmetic.solution(0, 0) == "0+0=0\n0"
    assert arithmetic.is_correct("17+25=", arithmetic.solution(17, 25))
    assert not arithmetic.is_correct("17+25=", "7+5=12\n1+2=3\n32")
    assert arithmetic.first_error(17, 25, "7+5=12\n1+2=3\n32") == 10
    assert arithmetic.first_error(17, 25, arithmetic.solution(17, 25)) is None


@pytest.mark.parametrize("kind", arithmetic.KINDS)
def test_arithmetic_rows_mark_the_first_error(kind):
    rng = random.Random(0)
    rows = arithmetic.make_pairs(200, seed=3, digits=3, kinds=(kind,))
    for r in rows:
        c, j, e = r["chosen"], r["rejected"], r["error_char"]
        assert r["kind"] == kind and set(r) == {"prompt", "chosen", "rejected", "error_char", "kind"}
        assert c[:e] == j[:e] and c[e] != j[e]
        a, b = (int(t) for t in r["prompt"][:-1].split("+"))
        assert c == arithmetic.solution(a, b) and arithmetic.first_error(a, b, j) == e
        assert arithmetic.is_correct(r["prompt"], c) and not arithmetic.is_correct(r["prompt"], j)
        on_answer_line = "\n" not in c[e:]
        assert on_answer_line == (kind == "answer")
    if kind == "carry":
        assert all("+1=" in r["chosen"].split("\n")[r["chosen"][: r["error_char"]].count("\n")] for r in rows)
    assert arithmetic.make_pairs(5, seed=3, kinds=(kind,)) == arithmetic.make_pairs(5, seed=3, kinds=(kind,))
    with pytest.raises(ValueError):
        arithmetic.corrupt(1, 2, "nonsense", rng)


def test_run_quick_writes_the_report(tmp_path):
    summary = run(tmp_path, seed=0, quick=True, progress=False)
    assert summary["passed"], {k: v["passed"] for k, v in summary["checks"].items()}
    assert set(summary["checks"]) == {"optimum", "sampled", "transformer", "argmax", "falling", "arithmetic"}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<script" not in page
    assert "-beta KL(pi_ref || pi) &lt;= 0" in page  # text is escaped
    for key in ("optimum", "sampled", "transformer", "argmax", "falling"):
        assert (tmp_path / f"{key}.png").read_bytes()[:4] == b"\x89PNG"

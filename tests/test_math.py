"""Token-level reward and loss formulas against slow, obvious loops, and the paper's identities."""

import math

import pytest
import torch

from r2q.losses import dpo_loss, sft_loss
from r2q.rewards import (
    aggregate_steps,
    cumulative_rewards,
    implicit_rewards,
    likelihood_score,
    sequence_rewards,
    step_ends_from_text,
    step_ids,
    step_rewards,
    token_rewards,
)

torch.manual_seed(0)
S, L, BETA = 4, 6, 0.1
LENGTHS = [6, 3, 1, 5]
MASK = torch.tensor([[t < n for t in range(L)] for n in LENGTHS])
POL = -torch.rand(S, L) * 5
REF = -torch.rand(S, L) * 5


def test_implicit_rewards_and_sums_match_loops():
    r = implicit_rewards(POL, REF, MASK, BETA)
    q = cumulative_rewards(r, MASK)
    R = sequence_rewards(r, MASK)
    for s, n in enumerate(LENGTHS):
        total = 0.0
        for t in range(L):
            expect = BETA * (POL[s, t].item() - REF[s, t].item()) if t < n else 0.0
            assert r[s, t].item() == pytest.approx(expect, abs=1e-7)
            total += expect
            if t < n:
                assert q[s, t].item() == pytest.approx(total, abs=1e-6)
        # token rewards sum to the sequence implicit reward beta * log pi(y|x)/pi_ref(y|x)
        seq = BETA * (POL[s, :n].sum() - REF[s, :n].sum())
        assert R[s].item() == pytest.approx(seq.item(), abs=1e-6)
        assert q[s, n - 1].item() == pytest.approx(R[s].item(), abs=1e-6)


def test_reference_free_rewards():
    r = implicit_rewards(POL, None, MASK, BETA)
    torch.testing.assert_close(r, (BETA * POL).masked_fill(~MASK, 0))


def test_token_rewards_one_formula_for_tensors_arrays_and_floats():
    """The elementwise Eq. 10 that search, best-of-n, MCTS, chunk-beam, credit and training all call."""
    import numpy as np

    for s, t in [(0, 0), (1, 2), (3, 4)]:
        lp, lr = POL[s, t].item(), REF[s, t].item()
        assert token_rewards(lp, lr, BETA) == pytest.approx(BETA * lp - BETA * lr, abs=1e-12)
        assert token_rewards(lp, lr, BETA, ref_term=True) == pytest.approx(BETA * lp, abs=1e-12)  # Eq. 13
        assert token_rewards(lp, None, BETA) == pytest.approx(BETA * lp, abs=1e-12)
    np.testing.assert_allclose(token_rewards(POL.numpy(), REF.numpy(), BETA), (BETA * (POL - REF)).numpy(), atol=1e-7)
    torch.testing.assert_close(token_rewards(POL, REF, BETA, ref_term=True), BETA * POL)
    assert likelihood_score([POL, REF]) is POL


def slow_dpo(rw, rl, beta, kind, eps=0.0):
    m = rw - rl
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid
    if kind == "sigmoid":
        return -ls(m)
    if kind == "cdpo":
        return -(1 - eps) * ls(m) - eps * ls(-m)
    return (m / beta - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("cdpo", 0.1), ("cdpo", 0.3), ("ipo", 0.0)])
def test_dpo_losses_match_formulas(kind, eps):
    rw, rl = torch.randn(8), torch.randn(8)
    got = dpo_loss(rw, rl, BETA, kind, eps)
    for i in range(8):
        assert got[i].item() == pytest.approx(slow_dpo(rw[i].item(), rl[i].item(), BETA, kind, eps), rel=1e-5)


def test_cdpo_with_zero_smoothing_is_dpo():
    rw, rl = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(dpo_loss(rw, rl, BETA, "cdpo", 0.0), dpo_loss(rw, rl, BETA))


@pytest.mark.parametrize("kind", ["sigmoid", "cdpo", "ipo"])
def test_loss_invariant_to_per_prompt_potential(kind):
    """Shaping the token rewards by a potential adds V(s_0) to both completions' sums; the loss ignores it."""
    B = 5
    pol_w, pol_l, ref_w, ref_l = (-torch.rand(B, L) * 4 for _ in range(4))
    m = MASK[[0, 1, 2, 3, 0]]
    rw = sequence_rewards(implicit_rewards(pol_w, ref_w, m, BETA), m)
    rl = sequence_rewards(implicit_rewards(pol_l, ref_l, m, BETA), m)
    base = dpo_loss(rw, rl, BETA, kind, 0.1 if kind == "cdpo" else 0.0)
    # a potential Phi with Phi(s_0) = v per prompt, Phi = 0 at the end: shaped token rewards
    # r'_t = r_t + Phi(s_{t+1}) - Phi(s_t) sum to r - v for any intermediate Phi
    v = torch.randn(B) * 3
    phi_w = torch.randn(B, L)
    phi_l = torch.randn(B, L)

    def shaped(pol, ref, phi):
        r = implicit_rewards(pol, ref, m, BETA)
        n = m.sum(-1)
        pot = torch.cat([v[:, None], phi], dim=1)  # Phi(s_0..s_L)
        for b in range(B):
            pot[b, n[b]:] = 0.0  # Phi = 0 after EOS
        return sequence_rewards(r + (pot[:, 1:] - pot[:, :-1]).masked_fill(~m, 0), m)

    shaped_loss = dpo_loss(shaped(pol_w, ref_w, phi_w), shaped(pol_l, ref_l, phi_l), BETA, kind,
                           0.1 if kind == "cdpo" else 0.0)
    torch.testing.assert_close(shaped_loss, base, atol=1e-5, rtol=1e-5)


def test_sft_loss_is_token_mean_nll():
    got = sft_loss(POL, MASK)
    expect = -sum(POL[s, t].item() for s in range(S) for t in range(L) if MASK[s, t]) / sum(LENGTHS)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert sft_loss(POL, MASK, reduction="sum").item() == pytest.approx(expect * sum(LENGTHS), rel=1e-6)


def test_step_aggregation_hand_computed():
    r = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0, 0.0], [0.5, 0.5, -4.0, 1.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    pieces = [["12", "+3\n", "=", "15\n", "ok"], ["a", "\n", "b\n", "c"]]
    ends = step_ends_from_text(pieces)
    assert ends.tolist() == [[False, True, False, True, False], [False, True, True, False, False]]
    ends = torch.cat([ends, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert step_ids(ends, m).tolist() == [[0, 0, 1, 1, 2, -1], [0, 0, 1, 2, -1, -1]]
    sums, sm = step_rewards(r, ends, m)
    # row 0 steps: [1-2], [0.5+3], [-1]; row 1 steps: [0.5+0.5], [-4], [1]
    assert sums.tolist() == [[-1.0, 3.5, -1.0], [1.0, -4.0, 1.0]]
    assert sm.all()
    assert aggregate_steps(sums, sm, "min").tolist() == [-1.0, -4.0]
    assert aggregate_steps(sums, sm, "sum").tolist() == [1.5, -2.0]
    assert aggregate_steps(sums, sm, "last").tolist() == [-1.0, 1.0]
    # a step reward is the difference of the cumulative reward q at consecutive step ends
    q = cumulative_rewards(r, m)
    assert q[0, 3].item() - q[0, 1].item() == pytest.approx(3.5)


def test_step_aggregation_uneven_steps():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.ones(2, 3, dtype=torch.bool)
    ends = torch.tensor([[True, True, False], [False, False, True]])
    sums, sm = step_rewards(r, ends, m)
    assert sm.tolist() == [[True, True, True], [True, False, False]]
    assert aggregate_steps(sums, sm, "min").tolist() == [1.0, 15.0]
    assert aggregate_steps(sums, sm, "last").tolist() == [3.0, 15.0]
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_steps(sums, sm, "mean")

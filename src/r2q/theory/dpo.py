"""DPO on the exact tree MDP, through the same code the trainer runs (`implicit_rewards`, `sequence_rewards`,
`dpo_loss`), for a tabular policy: one free logit per (state, action).

Preference data is a set of weighted pairs of completions of the same prompt with a soft label:
    L(theta) = sum_m w_m [ p_m l(R_theta(y1_m) - R_theta(y2_m)) + (1 - p_m) l(R_theta(y2_m) - R_theta(y1_m)) ]
with l(z) = -log sigmoid(z) (``dpo_loss``) and R_theta(y) = sum_t beta log pi_theta(a_t|s_t)/pi_ref(a_t|s_t).

- Infinite data (`exact_pairs`): every unordered pair {y1, y2} of a prompt, w = 2 q(y1) q(y2) / P with q the
  data distribution (pi_ref, or another policy), and the Bradley-Terry label p = sigmoid(R(y1) - R(y2)) on the
  true return R = sum_t r(s_t, a_t) (no beta log pi_ref term: that belongs to the KL regulariser, not to r).
  Its minimiser over all policies with full support has R_theta(y) = R(y) + c(x), i.e. pi_theta = pi*.
- Finite data (`sample_pairs`): N pairs drawn from q with labels drawn from Bernoulli(p); duplicates are merged
  into one weighted pair, so the loss equals the plain mean over the N pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import dpo_loss
from ..rewards import implicit_rewards, sequence_rewards
from .mdp import DTYPE, TheoryMDP, TokenTree, log_policy, token_values


@dataclass
class Pairs:
    """Weighted pairs of sequence indices of one prompt: first, second (M,) long; weight, p_first (M,) float64.

    p_first is the probability (or observed fraction) that `first` is the chosen completion.
    """

    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor
    p_first: torch.Tensor

    @property
    def total(self) -> float:
        return float(self.weight.sum())


def exact_pairs(tree: TokenTree, data_seq_logp: torch.Tensor, R: torch.Tensor) -> Pairs:
    """All unordered pairs y1 != y2 of each prompt, w = 2 q(y1) q(y2) / P, p = sigmoid(R(y1) - R(y2)).

    data_seq_logp: (S,) log q(y); R: (S,) true returns.
    """
    n = tree.per_prompt
    i, j = torch.triu_indices(n, n, offset=1)
    off = torch.arange(tree.n_prompts)[:, None] * n
    first, second = (i[None] + off).reshape(-1), (j[None] + off).reshape(-1)
    q = data_seq_logp.exp()
    w = 2.0 * q[first] * q[second] / tree.n_prompts
    return Pairs(first, second, w, torch.sigmoid(R[first] - R[second]))


def sample_pairs(tree: TokenTree, data_seq_logp: torch.Tensor, R: torch.Tensor, n_pairs: int,
                 generator: torch.Generator) -> tuple[Pairs, dict[str, int]]:
    """N preference pairs: a uniform prompt, y1, y2 ~ q(.|x), chosen = y1 with probability sigmoid(R(y1) - R(y2)).

    Pairs with y1 == y2 carry no gradient and are dropped; the rest are merged by unordered pair, weight =
    count / N and p_first = fraction in which the lower index was chosen. Returns the pairs and counts.
    """
    n = tree.per_prompt
    probs = tree.blocks(data_seq_logp.exp())
    p = torch.randint(tree.n_prompts, (n_pairs,), generator=generator)
    y = torch.stack([torch.multinomial(probs[i], 2, replacement=True, generator=generator) for i in p])
    y = y + p[:, None] * n
    first_wins = torch.rand(n_pairs, generator=generator, dtype=DTYPE) < torch.sigmoid(R[y[:, 0]] - R[y[:, 1]])
    keep = y[:, 0] != y[:, 1]
    lo, hi = y.min(-1).values[keep], y.max(-1).values[keep]
    lo_wins = torch.where(y[keep, 0] == lo, first_wins[keep], ~first_wins[keep])
    key = lo * tree.num_states + hi
    uniq, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
    wins = torch.zeros(len(uniq), dtype=DTYPE).index_add_(0, inv, lo_wins.to(DTYPE))
    pairs = Pairs(uniq // tree.num_states, uniq % tree.num_states, counts.to(DTYPE) / n_pairs, wins / counts)
    return pairs, {"pairs": n_pairs, "identical": int((~keep).sum()), "distinct": len(uniq)}


def implicit_sequence_rewards(tree: TokenTree, logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """R_theta(y) = sum_t beta log pi(a_t|s_t)/pi_ref(a_t|s_t) for every completion, with r2q's reward code.  (S,)"""
    mask = tree.seq_mask
    r = implicit_rewards(token_values(tree, logp), token_values(tree, ref_logp), mask, beta)
    return sequence_rewards(r, mask)


def pair_loss(R_theta: torch.Tensor, pairs: Pairs, beta: float) -> torch.Tensor:
    """sum_m w_m [p_m dpo(R1, R2) + (1 - p_m) dpo(R2, R1)] with r2q's `dpo_loss` (sigmoid).  -> scalar"""
    a, b = R_theta[pairs.first], R_theta[pairs.second]
    per = pairs.p_first * dpo_loss(a, b, beta) + (1 - pairs.p_first) * dpo_loss(b, a, beta)
    return (pairs.weight * per).sum()


def chosen_rejected_rewards(R_theta: torch.Tensor, pairs: Pairs) -> tuple[float, float]:
    """E[R_theta(chosen)] and E[R_theta(rejected)] under the pair distribution (weights normalised)."""
    a, b, p = R_theta[pairs.first], R_theta[pairs.second], pairs.p_first
    w = pairs.weight / pairs.weight.sum()
    return float((w * (p * a + (1 - p) * b)).sum()), float((w * (p * b + (1 - p) * a)).sum())


def free_logits(tree: TokenTree) -> torch.Tensor:
    """(S, V) bool: the logits a tabular policy is free to set, the allowed content tokens.

    EOS logits stay fixed (a softmax is unchanged by a shift per state, so fixing one logit per state loses
    nothing), and forced states have no choice at all. With these coordinates the map from logits to the
    completion distribution is one-to-one, and the DPO loss has an invertible Hessian at its optimum.
    """
    free = tree.allowed.clone()
    free[:, 0] = False
    return free


def fit_tabular(mdp: TheoryMDP, pairs: Pairs, ridge: float = 0.0, max_iter: int = 100,
                grad_tol: float = 1e-12) -> tuple[torch.Tensor, dict[str, float]]:
    """Minimise the DPO loss over per-state logits with damped Newton steps (float64), from pi = pi_ref.

    Newton is used rather than a first-order method because the loss weights a state by how often the data
    reaches it (down to ~1e-5 here): gradient steps would take forever on rare states, Newton is invariant to
    that scaling and converges to machine precision in a few dozen steps (the problem has ~100-250 logits).
    ridge > 0 adds (ridge / 2) ||theta - theta_ref||^2: with finite data some completions are never compared
    or always win and the plain DPO optimum is at infinity; the ridge (a Gaussian prior at the reference)
    keeps it finite, and its pull vanishes relative to the data as N grows.
    Returns the log-policy (S, V) and {loss, grad_max, iters}.
    """
    tree, ref = mdp.tree, mdp.ref_logp
    free = free_logits(tree)
    theta0 = ref.masked_fill(~tree.allowed, 0.0)
    x0 = theta0[free]

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        theta = theta0.masked_scatter(free, x)
        loss = pair_loss(implicit_sequence_rewards(tree, log_policy(tree, theta), ref, mdp.beta), pairs, mdp.beta)
        return loss + 0.5 * ridge * ((x - x0) ** 2).sum() if ridge else loss

    x, mu, it, gmax = x0.clone(), 1e-6, 0, float("inf")
    loss = loss_fn(x)
    for it in range(1, max_iter + 1):  # noqa: B007
        g = torch.autograd.functional.jacobian(loss_fn, x)
        gmax = float(g.abs().max())
        if gmax <= grad_tol:
            break
        Hm = torch.autograd.functional.hessian(loss_fn, x, vectorize=True)
        eye = torch.eye(len(x), dtype=x.dtype)
        while True:  # Levenberg-Marquardt damping: shrink mu after a success, grow it after a failure
            step = torch.linalg.solve(Hm + mu * eye, g)
            new_loss = loss_fn(x - step)
            if new_loss <= loss or mu > 1e8:
                break
            mu *= 10.0
        x, loss, mu = x - step, new_loss, max(mu / 10.0, 1e-12)
    theta = theta0.masked_scatter(free, x)
    return log_policy(tree, theta), {"loss": float(loss), "grad_max": gmax, "iters": it}


def train_run(mdp: TheoryMDP, pairs: Pairs, steps: int = 200, lr: float = 0.05):
    """A DPO training run (Adam on the tabular logits, full batch), yielding (step, log-policy (S, V)) from step 0;
    the caller computes what it wants from each log-policy."""
    tree, ref = mdp.tree, mdp.ref_logp
    theta = ref.masked_fill(~tree.allowed, 0.0).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for step in range(steps + 1):
        logp = log_policy(tree, theta)
        yield step, logp.detach()
        if step == steps:
            break
        opt.zero_grad()
        pair_loss(implicit_sequence_rewards(tree, logp, ref, mdp.beta), pairs, mdp.beta).backward()
        opt.step()

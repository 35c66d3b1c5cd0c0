"""A token-level MDP small enough to solve exactly (float64): the paper's setting with nothing estimated.

The tree. Token ids: 0 is EOS, 1..K are content tokens, so a policy acts over V = K + 1 actions. Each of P
prompts is the root of its own tree; a state is a prompt plus the tokens generated so far, an action appends a
token, EOS ends the episode, and a completion has at most H tokens counting its EOS (states at depth H - 1 can
only take EOS: the horizon forces it, with probability 1 under every policy).

Indexing. States are numbered prompt-major, and level by level within a prompt (a parent before its children):
``n = sum_{d<H} K^d`` states per prompt, ``S = P * n`` in all. Every state s ends exactly one completion, the
one that takes EOS at s, so sequences and states share their index: sequence j is the path root -> state j,
then EOS, of length ``depth[j] + 1``. Sequences of prompt p are the block ``p*n .. (p+1)*n - 1``.

Tables. A policy (or reward) is an ``(S, V)`` table over state-action pairs; policies are log-prob tables with
-inf on disallowed actions (non-EOS at depth H - 1). ``token_values(tree, table)`` lays a table out
completion-aligned ``(S, H)`` with the mask ``tree.seq_mask``, the layout of ``r2q.rewards``.

Soft Bellman equations (exact by one backward sweep over depth, the tree being finite):
    Q*(s,a) = r(s,a) + beta * log pi_ref(a|s) + V*(s'),    V*(s') = 0 after EOS
    V*(s)   = beta * log sum_a exp(Q*(s,a) / beta)
    pi*(a|s) = exp((Q*(s,a) - V*(s)) / beta)
so that beta * log pi*(a|s)/pi_ref(a|s) = r(s,a) + V*(s') - V*(s) and, summed over a completion y,
beta * log pi*(y)/pi_ref(y) = R(y) - V*(s_0),  i.e.  pi*(y) = pi_ref(y) exp(R(y)/beta) / exp(V*(s_0)/beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_beta, check_count, check_seed

DTYPE = torch.float64
EOS = 0


@dataclass
class TokenTree:
    """The state tree of P prompts, K content tokens and horizon H (see the module docstring).

    prompt, depth, parent, token: (S,) long; parent = -1 and token = -1 at roots.
    child: (S, V) long, the state reached by a content token (-1 for EOS and for disallowed actions).
    allowed: (S, V) bool.  seq_state, seq_action: (S, H) long, the state and action at each step of
    sequence j (0 where masked).  seq_mask: (S, H) bool.
    """

    n_tokens: int
    horizon: int
    n_prompts: int
    prompt: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor
    token: torch.Tensor
    child: torch.Tensor
    allowed: torch.Tensor
    seq_state: torch.Tensor
    seq_action: torch.Tensor
    seq_mask: torch.Tensor

    @property
    def num_states(self) -> int:
        return int(self.depth.numel())

    @property
    def per_prompt(self) -> int:
        return self.num_states // self.n_prompts

    @property
    def vocab(self) -> int:
        return self.n_tokens + 1

    def tokens(self, j: int) -> tuple[int, ...]:
        """Completion j as token ids, EOS included."""
        n = int(self.seq_mask[j].sum())
        return tuple(int(a) for a in self.seq_action[j, :n])

    def index(self, prompt: int, tokens: tuple[int, ...] | list[int]) -> int:
        """The sequence index of a completion (EOS included) of `prompt`; KeyError if it is not in the tree."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens or tokens[-1] != EOS or EOS in tokens[:-1] or len(tokens) > self.horizon:
            raise KeyError(tokens)
        s = prompt * self.per_prompt
        for a in tokens[:-1]:
            if not 1 <= a <= self.n_tokens:
                raise KeyError(tokens)
            s = int(self.child[s, a])
        return s

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(S, ...) -> (P, n, ...): per-sequence (or per-state) values grouped by prompt."""
        return x.reshape(self.n_prompts, self.per_prompt, *x.shape[1:])


def build_tree(n_tokens: int = 3, horizon: int = 4, n_prompts: int = 2) -> TokenTree:
    """All states of P prompt trees with K content tokens and at most H completion tokens (EOS included)."""
    for name, v in (("n_tokens", n_tokens), ("horizon", horizon), ("n_prompts", n_prompts)):
        check_count(v, name)
    V = n_tokens + 1
    paths: list[tuple[int, tuple[int, ...]]] = []
    for p in range(n_prompts):
        level = [()]
        for _ in range(horizon):
            paths += [(p, path) for path in level]
            level = [path + (a,) for path in level for a in range(1, V)]
    where = {pp: i for i, pp in enumerate(paths)}
    S = len(paths)
    prompt = torch.tensor([p for p, _ in paths])
    depth = torch.tensor([len(path) for _, path in paths])
    parent = torch.tensor([where[(p, path[:-1])] if path else -1 for p, path in paths])
    token = torch.tensor([path[-1] if path else -1 for _, path in paths])
    child = torch.full((S, V), -1, dtype=torch.long)
    allowed = torch.zeros(S, V, dtype=torch.bool)
    allowed[:, EOS] = True
    seq_state = torch.zeros(S, horizon, dtype=torch.long)
    seq_action = torch.zeros(S, horizon, dtype=torch.long)
    seq_mask = torch.zeros(S, horizon, dtype=torch.bool)
    for i, (p, path) in enumerate(paths):
        if len(path) < horizon - 1:
            allowed[i, 1:] = True
            for a in range(1, V):
                child[i, a] = where[(p, path + (a,))]
        for t in range(len(path) + 1):
            seq_state[i, t] = where[(p, path[:t])]
            seq_action[i, t] = path[t] if t < len(path) else EOS
            seq_mask[i, t] = True
    return TokenTree(n_tokens, horizon, n_prompts, prompt, depth, parent, token, child, allowed,
                     seq_state, seq_action, seq_mask)


def log_policy(tree: TokenTree, logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the allowed actions of each state: (S, V) logits -> (S, V) log-probs, -inf if disallowed."""
    return torch.log_softmax(logits.masked_fill(~tree.allowed, float("-inf")), dim=-1)


def token_values(tree: TokenTree, table: torch.Tensor) -> torch.Tensor:
    """Completion-aligned values of a state-action table: out[j, t] = table[s_t, a_t] of sequence j.

    (S, V) -> (S, H), 0 where ``tree.seq_mask`` is False. With a log-policy table these are the per-token
    log-probs that ``r2q.rewards.implicit_rewards`` takes.
    """
    vals = table[tree.seq_state, tree.seq_action]
    return vals.masked_fill(~tree.seq_mask, 0.0)


def sequence_logps(tree: TokenTree, logp: torch.Tensor) -> torch.Tensor:
    """log pi(y_j) = sum_t log pi(a_t|s_t) for every completion j: (S, V) -> (S,)."""
    return token_values(tree, logp).sum(-1)


def occupancy(tree: TokenTree, logp: torch.Tensor) -> torch.Tensor:
    """d_pi(s): the probability that a rollout of pi passes through state s (1 at each root).  (S, V) -> (S,)

    Computed top-down over the tree (independent of the sequence enumeration), d(s') = d(s) pi(a|s).
    """
    d = torch.zeros(tree.num_states, dtype=logp.dtype)
    for s in range(tree.num_states):  # BFS order: a parent comes before its children
        par = int(tree.parent[s])
        d[s] = 1.0 if par < 0 else d[par] * logp[par, int(tree.token[s])].exp()
    return d


def kl_by_states(tree: TokenTree, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) between the completion distributions of each prompt, by the chain rule over states:

    KL(p(y|x) || q(y|x)) = sum_s d_p(s) sum_a p(a|s) (log p(a|s) - log q(a|s)).   (S, V), (S, V) -> (P,)
    """
    p = logp.exp()
    per_state = torch.where(tree.allowed, p * (logp - logq.masked_fill(~tree.allowed, 0.0)), 0.0).sum(-1)
    return tree.blocks(occupancy(tree, logp) * per_state).sum(-1)


def soft_value_iteration(
    tree: TokenTree, reward: torch.Tensor, ref_logp: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact Q*, V*, log pi* of the KL-regularised objective, by backward induction over depth.

    reward, ref_logp: (S, V).  Returns Q* (S, V) (-inf where disallowed), V* (S,), log pi* (S, V).
    Q*(s,a) = r(s,a) + beta log pi_ref(a|s) + V*(s') (V* = 0 after EOS); V*(s) = beta logsumexp(Q*(s,.)/beta).
    """
    check_beta(beta)
    S = tree.num_states
    Q = torch.full((S, tree.vocab), float("-inf"), dtype=DTYPE)
    V = torch.zeros(S, dtype=DTYPE)
    for d in range(tree.horizon - 1, -1, -1):
        at = (tree.depth == d).nonzero().squeeze(-1)
        nxt = torch.where(tree.child[at] >= 0, V[tree.child[at].clamp(min=0)], 0.0)
        q = reward[at] + beta * ref_logp[at] + nxt
        Q[at] = q.masked_fill(~tree.allowed[at], float("-inf"))
        V[at] = beta * torch.logsumexp(Q[at] / beta, dim=-1)
    return Q, V, ((Q - V[:, None]) / beta).masked_fill(~tree.allowed, float("-inf"))


def shaped_reward(tree: TokenTree, reward: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """r(s,a) + V(s') - V(s) with V = 0 after EOS: the potential-shaped reward the DPO optimum recovers.  (S, V)"""
    nxt = torch.where(tree.child >= 0, V[tree.child.clamp(min=0)], 0.0)
    return (reward + nxt - V[:, None]).masked_fill(~tree.allowed, 0.0)


def tilted_sequence_logps(tree: TokenTree, ref_seq_logp: torch.Tensor, R: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*(y) from sequences alone: log pi_ref(y) + R(y)/beta - log sum_y' pi_ref(y') exp(R(y')/beta).  (S,)"""
    z = tree.blocks(ref_seq_logp + R / beta)
    return (z - torch.logsumexp(z, dim=-1, keepdim=True)).reshape(-1)


def tv_distance(tree: TokenTree, logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Total variation 1/2 sum_y |p(y) - q(y)| per prompt, from sequence log-probs (S,) -> (P,)."""
    return 0.5 * tree.blocks((logp_a.exp() - logp_b.exp()).abs()).sum(-1)


@dataclass
class TheoryMDP:
    """A tree, a reference log-policy (S, V), a per-token true reward (S, V) (0 where disallowed) and beta."""

    tree: TokenTree
    ref_logp: torch.Tensor
    reward: torch.Tensor
    beta: float

    def solve(self) -> Solution:
        Q, V, logp = soft_value_iteration(self.tree, self.reward, self.ref_logp, self.beta)
        return Solution(Q, V, logp, shaped_reward(self.tree, self.reward, V))

    def true_returns(self) -> torch.Tensor:
        """R(y) = sum_t r(s_t, a_t) for every completion: (S,)."""
        return token_values(self.tree, self.reward).sum(-1)


@dataclass
class Solution:
    """Q* (S, V), V* (S,), log pi* (S, V) and the shaped reward r + V*(s') - V*(s) (S, V)."""

    Q: torch.Tensor
    V: torch.Tensor
    logp: torch.Tensor
    shaped: torch.Tensor


def random_mdp(seed: int = 0, n_tokens: int = 3, horizon: int = 4, n_prompts: int = 2, beta: float = 0.5,
               ref_scale: float = 1.0, reward_scale: float = 1.0) -> TheoryMDP:
    """A random instance: reference logits ~ N(0, ref_scale^2), rewards ~ N(0, reward_scale^2) per (s, a)."""
    check_beta(beta)
    for name, v in (("ref_scale", ref_scale), ("reward_scale", reward_scale)):
        check_beta(v, name, zero_ok=True)
    check_seed(seed)
    tree = build_tree(n_tokens, horizon, n_prompts)
    g = torch.Generator().manual_seed(seed)
    ref_logits = ref_scale * torch.randn(tree.num_states, tree.vocab, generator=g, dtype=DTYPE)
    reward = reward_scale * torch.randn(tree.num_states, tree.vocab, generator=g, dtype=DTYPE)
    return TheoryMDP(tree, log_policy(tree, ref_logits), reward.masked_fill(~tree.allowed, 0.0), beta)

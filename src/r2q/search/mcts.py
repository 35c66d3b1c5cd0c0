"""Monte Carlo tree search over the token MDP with the DPO policy as prior and the implicit reward as Q.

Each edge (s, a) carries the implicit reward r = beta * (log pi(a|s) - log pi_ref(a|s)), plus
beta * log pi_ref(a|s) when ref_term (then the return of a full sequence is beta * log pi(y|x),
the paper's Eq. 13). Selection is PUCT, a = argmax_a Qn(s,a) + c * P(a|s) * sqrt(N(s)) / (1 + N(s,a)), with
P the policy and Qn the edge value min-max normalised over the tree (as MuZero does, so c is scale-free).
The environment is deterministic, so by default an edge's value is the best return seen through it
(backup="max"; "mean" averages instead). A leaf is valued by a greedy policy rollout to the end (rollout=True;
rollout_len caps it, then the leaf is valued by the rewards the rollout collected) or by the rewards collected so far
(rollout=False). The answer is the best complete sequence found (or, when none was, the most visited path
finished greedily).

Tree nodes keep the keys and values of their own token only; expanding a batch of leaves (one per prompt
per simulation) stacks the cached KV of each leaf's path, so no prefix is ever recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..rewards import token_rewards
from .hypothesis import Hypothesis
from .lm import Lockstep, left_pad, row_kv, stack_kv


@dataclass
class Node:
    token: int
    parent: Node | None
    reward: float  # reward of the edge parent -> self
    prior: float
    depth: int
    kv: list | None = None  # per model: [(k, v) per layer] of this node's token (the prompt for the root)
    children: dict[int, Node] = field(default_factory=dict)
    visits: int = 0
    value: float = float("-inf")  # best (or mean) return from self onward, reward to reach self excluded
    total: float = 0.0
    terminal: bool = False
    pending: bool = False  # selected in this batch of simulations, not yet expanded

    def path(self) -> list[Node]:
        n, out = self, []
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def tokens(self) -> list[int]:
        return [n.token for n in self.path()[1:]]

    def edge_q(self, backup: str) -> float:
        v = 0.0 if self.terminal else (self.value if backup == "max" else self.total / max(self.visits, 1))
        return self.reward + (v if math.isfinite(v) else 0.0)


def _path_kv(node: Node, m: int):
    layers = None
    for n in node.path():
        if layers is None:
            layers = [[(k, v)] for k, v in n.kv[m]]
        else:
            for layer, (k, v) in zip(layers, n.kv[m]):
                layer.append((k, v))
    return [(torch.cat([k for k, _ in layer], 1), torch.cat([v for _, v in layer], 1)) for layer in layers]


BLOCKED = False  # `_Search.select`: every open path of the tree ends at a leaf already selected in this batch


@dataclass
class _Search:
    """One batch's trees and the settings every step of the search reads."""

    lock: Lockstep
    eos: set[int]
    pad_id: int
    max_new_tokens: int
    beta: float
    c_puct: float
    expand_top_k: int
    ref_term: bool
    backup: str
    rollout_len: int
    roots: list[Node] = field(default_factory=list)
    best: list[tuple[list[int], float]] = field(default_factory=list)  # per prompt: the best complete sequence

    def offer(self, b: int, toks: list[int], ret: float) -> None:
        if ret > self.best[b][1]:
            self.best[b] = (toks, ret)

    def expand(self, node: Node, logps: list[torch.Tensor]) -> None:
        _expand(node, logps, self.beta, self.expand_top_k, self.ref_term, self.eos, self.max_new_tokens)

    def rollout(self, leaves: list[tuple[int, Node]], logps, max_steps: int) -> list[tuple[float, list[int], bool]]:
        return _rollout(self.lock, leaves, logps, self.beta, self.ref_term, self.eos, self.max_new_tokens,
                        self.pad_id, max_steps)

    def select(self, b: int) -> Node | None | bool:
        """Walk prompt b's tree by PUCT to a leaf; a terminal reached is backed up and offered here, and None is
        returned unless the leaf is one to expand. The leaf is marked pending and its visit counted at once (a
        virtual loss), so the next selection of the same batch goes elsewhere; BLOCKED (and nothing counted) when
        every open path ends at a pending leaf."""
        node, (lo, hi) = self.roots[b], _bounds(self.roots[b], self.backup)
        walked = []
        while node.children:
            node.visits += 1
            walked.append(node)
            sq = math.sqrt(node.visits)
            open_children = [c for c in node.children.values() if not (_exhausted(c) or c.pending)]
            if not open_children:
                if any(c.pending for c in node.children.values()):
                    for n in walked:
                        n.visits -= 1
                    return BLOCKED
                break
            node = max(open_children, key=lambda ch: _puct(ch, lo, hi, sq, self.c_puct, self.backup))  # noqa: B023
        if node.terminal:
            node.visits += 1
            _backup(node, 0.0, self.backup)
            self.offer(b, node.tokens(), sum(n.reward for n in node.path()))
        elif not node.children and not _exhausted(node):
            node.visits += 1
            node.pending = True
            return node
        return None

    def grow(self, leaves: list[tuple[int, Node]], rollout: bool) -> None:
        """Expand every leaf with one batched forward, value each (by a rollout, or 0) and back the values up."""
        logps = _step_into(self.lock, [n for _, n in leaves])
        for i, (_, node) in enumerate(leaves):
            node.kv = [row_kv(c, i, c.get_seq_length() - 1) for c in self.lock.caches]
            self.expand(node, [lp[i] for lp in logps])
        values = self.rollout(leaves, logps, self.rollout_len) if rollout else [(0.0, [], False) for _ in leaves]
        for (b, node), (v, tail, complete) in zip(leaves, values):
            node.pending = False  # its visit was counted when it was selected
            _backup(node, v, self.backup)
            if complete:
                self.offer(b, node.tokens() + tail, sum(n.reward for n in node.path()) + v)

    def finish(self) -> None:
        """A prompt with no complete sequence found (capped rollouts, few simulations) gets its most visited path,
        finished by one greedy rollout: the answer is always a complete sequence."""
        unfinished = []
        for b, root in enumerate(self.roots):
            if self.best[b][0]:
                continue
            node = root
            while node.children and any(c.visits for c in node.children.values()):
                node = max(node.children.values(), key=lambda c: c.visits)
            if node.terminal or node is root:
                self.best[b] = (node.tokens(), sum(n.reward for n in node.path()))
            else:
                unfinished.append((b, node))
        if unfinished:
            tails = self.rollout(unfinished, _step_into(self.lock, [n for _, n in unfinished]), 0)
            for (b, node), (v, tail, _) in zip(unfinished, tails):
                self.best[b] = (node.tokens() + tail, sum(n.reward for n in node.path()) + v)


def mcts(
    lock: Lockstep,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    beta: float,
    simulations: int = 64,
    c_puct: float = 1.0,
    expand_top_k: int = 16,
    ref_term: bool = True,
    rollout: bool = True,
    backup: str = "max",
    rollout_len: int = 0,
    sims_per_call: int = 1,
) -> list[Hypothesis]:
    """The best hypothesis per prompt, scored by its return. lock.models = [policy, ref] (or [policy] for
    reference-free). rollout_len caps each rollout (0: to EOS or max_new_tokens); a capped rollout values its leaf
    by the rewards it collected, and only complete rollouts are offered as answers. A prompt whose search found no
    complete sequence gets its most visited path finished by a greedy rollout (counted in the compute).
    sims_per_call: simulations of each prompt selected together (with a virtual loss) and expanded by one forward
    per model; 1 is the sequential search."""
    if backup not in ("max", "mean"):
        raise ValueError("backup must be 'max' or 'mean'")
    ids, mask = left_pad(prompts, pad_id)
    logps = lock.prefill(ids, mask)
    T = ids.shape[1]
    s = _Search(lock, set(eos_ids), pad_id, max_new_tokens, beta, c_puct, expand_top_k, ref_term, backup,
                rollout_len, best=[([], float("-inf"))] * len(prompts))
    for b, p in enumerate(prompts):
        root = Node(-1, None, 0.0, 1.0, 0)
        root.kv = [row_kv(c, b, T - len(p)) for c in lock.caches]
        s.expand(root, [lp[b] for lp in logps])
        s.roots.append(root)
    left = [simulations] * len(prompts)
    while any(left):
        leaves = []
        for b in range(len(prompts)):
            for _ in range(min(sims_per_call, left[b])):
                leaf = s.select(b)
                if leaf is BLOCKED:
                    break
                left[b] -= 1
                if leaf is not None:
                    leaves.append((b, leaf))
        if leaves:
            s.grow(leaves, rollout)
        elif all(_exhausted(r) for r in s.roots):
            break
    s.finish()
    return [Hypothesis(toks, ret) for toks, ret in s.best]


def _step_into(lock: Lockstep, nodes: list[Node]) -> list[torch.Tensor]:
    """One batched forward of every model over each node's own token, on the stacked KV of its parent's path: the
    lockstep then holds one row per node, and the next-token log-probs (N, V) per model come back."""
    stacked = [stack_kv([_path_kv(n.parent, m) for n in nodes]) for m in range(len(lock.models))]
    lock.attach([c for c, _ in stacked], stacked[0][1])
    return lock.step(torch.tensor([n.token for n in nodes]))


def _expand(node: Node, logps: list[torch.Tensor], beta: float, k: int, ref_term: bool, eos: set[int],
            max_depth: int) -> None:
    pol = logps[0]
    top = torch.topk(pol, min(k, pol.shape[-1])).indices.tolist()
    for a in top:
        lp = float(pol[a])
        r = token_rewards(lp, float(logps[1][a]) if len(logps) > 1 else None, beta, ref_term)
        ch = Node(a, node, r, math.exp(lp), node.depth + 1)
        ch.terminal = a in eos or ch.depth >= max_depth
        node.children[a] = ch


def _puct(ch: Node, lo: float, hi: float, sqrt_parent_visits: float, c: float, backup: str) -> float:
    """Min-max normalised edge value (0 for unvisited edges) + c * P(a|s) * sqrt(N(s)) / (1 + N(s,a))."""
    q = (ch.edge_q(backup) - lo) / (hi - lo) if hi > lo and (ch.visits or ch.terminal) else 0.0
    return q + c * ch.prior * sqrt_parent_visits / (1 + ch.visits)


def _exhausted(node: Node) -> bool:
    """A terminal leaf, or a subtree whose every branch is exhausted: nothing left to find below it."""
    if node.terminal:
        return False  # a terminal can still be revisited cheaply; the root loop stops on its own
    return bool(node.children) and all(c.terminal or _exhausted(c) for c in node.children.values()) and \
        all(c.visits for c in node.children.values())


def _bounds(root: Node, backup: str) -> tuple[float, float]:
    qs, stack = [], [root]
    while stack:
        n = stack.pop()
        for c in n.children.values():
            if c.visits or c.terminal:
                qs.append(c.edge_q(backup))
                stack.append(c)
    return (min(qs), max(qs)) if qs else (0.0, 0.0)


def _backup(node: Node, value: float, backup: str) -> None:
    """Propagate the return from `node` (its own edge reward excluded) up to the root."""
    g = value
    while node is not None:
        if backup == "max":
            node.value = max(node.value, g)
        else:
            node.total += g
        g = node.reward + g
        node = node.parent


@torch.no_grad()
def _rollout(lock: Lockstep, leaves, logps, beta, ref_term, eos, max_depth, pad_id, max_steps: int = 0):
    """Greedy policy continuation of every non-terminal leaf, for at most max_steps tokens (0: to EOS or the
    length cap); returns (sum of edge rewards, tokens, whether the continuation is complete) each."""
    n = len(leaves)
    value = torch.zeros(n)
    tails: list[list[int]] = [[] for _ in range(n)]
    alive = torch.tensor([not node.terminal for _, node in leaves])
    depth = torch.tensor([node.depth for _, node in leaves])
    steps = 0
    while alive.any():
        pol = logps[0]
        nxt = pol.argmax(-1).cpu()
        lp = pol.gather(-1, nxt[:, None].to(pol.device)).squeeze(-1).cpu()
        lr = logps[1].gather(-1, nxt[:, None].to(pol.device)).squeeze(-1).cpu() if len(logps) > 1 else None
        r = token_rewards(lp, lr, beta, ref_term)
        value += torch.where(alive, r, torch.zeros_like(r))
        for i in torch.nonzero(alive).flatten().tolist():
            tails[i].append(int(nxt[i]))
        depth = depth + 1
        steps += 1
        step_alive = alive
        alive = alive & ~torch.tensor([int(x) in eos for x in nxt]) & (depth < max_depth)
        if not alive.any() or steps == max_steps:
            break
        logps = lock.step(torch.where(step_alive, nxt, torch.full_like(nxt, pad_id)), alive=step_alive)
    return list(zip(value.tolist(), tails, (~alive).tolist()))

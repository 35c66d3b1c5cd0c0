"""MCTS in batches: with one simulation per call the search equals a slow, obvious sequential MCTS (a full forward
per node, no cache, one leaf at a time); with several per call (a virtual loss spreads them over the tree) it needs
fewer model calls for the same simulations and still finds the optimum of a tree it can cover."""

import math

import pytest
import torch
from conftest import EOS, PAD, enumerate_best, prompts_of, sharp_model

from r2q.rewards import token_rewards
from r2q.search import GenerateConfig, generate_ids
from r2q.search.mcts import Node, _backup, _bounds, _exhausted, _expand, _puct


@torch.no_grad()
def next_logps(models, tokens):
    return [torch.log_softmax(m(input_ids=torch.tensor([tokens])).logits[0, -1].float(), -1) for m in models]


def slow_mcts(pol, ref, prompt, cfg: GenerateConfig):
    """The search as its docstring states it, one simulation after another, every node's log-probs from a full
    forward over prompt + path: PUCT selection, expansion of the top-k children, a greedy rollout of at most
    rollout_len tokens valued by its rewards, backup; the best complete sequence found (or the most visited path
    finished greedily)."""
    models, eos, L = [pol, ref], {EOS}, cfg.max_new_tokens

    def expand(node):
        _expand(node, next_logps(models, prompt + node.tokens()), cfg.beta, cfg.expand_top_k, cfg.ref_term, eos, L)

    def roll(node, cap):
        toks, v, depth = node.tokens(), 0.0, node.depth
        tail = []
        while True:
            lp = next_logps(models, prompt + toks + tail)
            a = int(lp[0].argmax())
            v += float(token_rewards(lp[0][a], lp[1][a], cfg.beta, cfg.ref_term))
            tail.append(a)
            depth += 1
            if a == EOS or depth >= L:
                return v, tail, True
            if len(tail) == cap:
                return v, tail, False

    root = Node(-1, None, 0.0, 1.0, 0)
    expand(root)
    best = ([], -math.inf)
    for _ in range(cfg.simulations):
        node, (lo, hi) = root, _bounds(root, cfg.backup)
        while node.children:
            node.visits += 1
            open_children = [c for c in node.children.values() if not _exhausted(c)]
            if not open_children:
                break
            node = max(open_children, key=lambda ch: _puct(ch, lo, hi, math.sqrt(node.visits), cfg.c_puct,  # noqa: B023
                                                           cfg.backup))
        if node.terminal:
            node.visits += 1
            _backup(node, 0.0, cfg.backup)
            ret = sum(n.reward for n in node.path())
            best = (node.tokens(), ret) if ret > best[1] else best
        elif not node.children and not _exhausted(node):
            expand(node)
            v, tail, complete = roll(node, cfg.rollout_len)
            node.visits += 1
            _backup(node, v, cfg.backup)
            ret = sum(n.reward for n in node.path()) + v
            if complete and ret > best[1]:
                best = (node.tokens() + tail, ret)
    if not best[0]:
        node = root
        while node.children and any(c.visits for c in node.children.values()):
            node = max(node.children.values(), key=lambda c: c.visits)
        v, tail, _ = roll(node, 0) if not node.terminal else (0.0, [], True)
        best = (node.tokens() + tail, sum(n.reward for n in node.path()) + v)
    return best


@pytest.mark.parametrize("backup", ["max", "mean"])
def test_one_simulation_per_call_is_the_sequential_search(backup):
    pol, ref = sharp_model("llama", seed=60, scale=2.0, eos_bias=-1.0), sharp_model("llama", seed=61, scale=2.0)
    prompts = prompts_of(3, seed=13)
    cfg = GenerateConfig(method="mcts", max_new_tokens=8, simulations=12, expand_top_k=3, rollout_len=3, beta=0.4,
                         backup=backup, sims_per_call=1)
    out, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
    for p, h in zip(prompts, out):
        toks, ret = slow_mcts(pol, ref, p, cfg)
        assert h.token_ids == toks
        assert h.score == pytest.approx(ret, abs=1e-4)


def test_several_simulations_per_call_still_find_the_optimum():
    vocab, depth, beta = 5, 4, 0.5
    pol = sharp_model("llama", seed=20, vocab=vocab, scale=1.5, eos_bias=0.0)
    ref = sharp_model("llama", seed=21, vocab=vocab, scale=1.5, eos_bias=0.0)
    prompts = [[2, 3], [4], [3, 3, 2]]
    cfg = GenerateConfig(method="mcts", max_new_tokens=depth, simulations=500, expand_top_k=vocab, beta=beta,
                         ref_term=True, sims_per_call=8)
    out, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
    for p, h in zip(prompts, out):
        best, best_ret, _ = enumerate_best(pol, ref, p, vocab, depth, beta, True)
        assert h.token_ids == best and h.score == pytest.approx(best_ret, abs=1e-4)


def test_several_simulations_per_call_share_each_forward():
    # EOS is unlikely, so nearly every simulation expands a leaf and rolls it out to the length cap
    pol, ref = sharp_model("llama", seed=62, scale=1.0, eos_bias=-10.0), sharp_model("llama", seed=63, scale=1.0)
    prompts = prompts_of(3, seed=14)
    calls = {}
    for per_call in (1, 8):
        cfg = GenerateConfig(method="mcts", max_new_tokens=12, simulations=24, expand_top_k=8, rollout_len=0,
                             beta=0.3, sims_per_call=per_call)
        out, compute = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
        assert all(h.token_ids[-1] == EOS or h.num_tokens == 12 for h in out)
        calls[per_call] = compute.forward_passes
    assert calls[8] * 4 < calls[1]  # up to 8 leaves of each prompt per forward (332 calls against 62 when written)

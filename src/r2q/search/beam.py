"""Beam search over any per-token score, batched over prompts, with every model's cache in lockstep.

With the policy's log-probs as the score this is likelihood search on the DPO policy, the paper's search
over Q* (Eq. 13: the plain sum of log-probs, length_penalty=0). With beta * log pi/pi_ref it is search on the
implicit reward, and adding beta * log pi_ref gives back beta * log pi: the same ranking (Eq. 13 again).

The loop follows `transformers`' vectorised beam search step for step (top 2K continuations, finished
hypotheses kept in a separate best-K list, score / generated_length ** length_penalty, its early-stopping
heuristic), so for the log-prob score it returns the same tokens as `generate(num_beams=K)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .hypothesis import Hypothesis
from .lm import Lockstep, left_pad

ScoreFn = Callable[[list[torch.Tensor]], torch.Tensor]
NEG = -1.0e9


Node = tuple  # a generated token in the tree of beams: (parent Node or None at the prompt, token id)


def tokens_of(node: Node | None) -> list[int]:
    """The tokens from the prompt to `node`."""
    out = []
    while node is not None:
        node, tok = node
        out.append(tok)
    return out[::-1]


def shared_depth(a: Node | None, b: Node | None, depth: int) -> int:
    """How many first tokens two beams of depth `depth` share: the depth of their last common node (the tree is
    walked up from both, so the cost is the number of tokens they do not share)."""
    while a is not b:
        a, b, depth = a[0], b[0], depth - 1
    return depth


@dataclass
class Finished:
    """A hypothesis that ended: its score (with the length penalty), its last node, and every model's summed
    log-prob."""

    score: float
    node: Node
    logps: list[float]


@dataclass
class Prompt:
    """One prompt's search: its K live beams (last node, summed log-prob of each model) and its best K finished
    hypotheses, best first. The live beams' scores are the rows of a tensor (the next step adds to them there)."""

    index: int
    beams: list[Node | None]
    beam_logps: list[list[float]]
    finished: list[Finished] = field(default_factory=list)


def _top_k(scores: torch.Tensor, running: torch.Tensor, k: int, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best continuations of B prompts' K beams: torch.topk over (B, K * V) of each beam's running score
    (running, (B, K)) plus each token's (scores, (B * K, V)), largest first, found by way of the chunks of `chunk`
    tokens that hold them: every chunk's max, the k chunks with the largest maxes plus the running score, and a
    top-k over their elements (and the tail past each beam's last whole chunk). The sum is never made for the whole
    K x V: chunk maxes are taken of the token scores and the running score added after (a + r rounds monotonically
    in a, so the max of the sums is the sum of the max), and the chosen elements are added one by one. The values
    are torch.topk's of the full sum, rank by rank (an element outside the chosen chunks has k chunk maxes at least
    as large); among exactly equal values the indices may be others. On CPU torch.topk over (16, 16384) costs
    about 20 times a max over it, so this is several times faster where K x V is large."""
    (B, K), V = running.shape, scores.shape[-1]
    nc = V // chunk  # whole chunks per beam
    if K * nc < 4 * k or k > chunk:  # few chunks: no faster
        return torch.topk((scores.view(B, K, V) + running[:, :, None]).view(B, K * V), k)
    n, dev = nc * chunk, scores.device
    by_beam = scores.view(B, K, V)
    maxes = by_beam[:, :, :n].unflatten(-1, (nc, chunk)).amax(-1) + running[:, :, None]
    best = torch.topk(maxes.view(B, K * nc), k).indices  # (B, k): chunk c of beam j is j * nc + c
    beam = best // nc
    if n == V:  # the chunks are rows of a (B * K * nc, chunk) view
        rows = (best + torch.arange(B, device=dev)[:, None] * (K * nc)).view(-1)
        part = scores.view(-1, chunk).index_select(0, rows).view(B, k, chunk)
    else:
        at = (beam * V + best % nc * chunk)[:, :, None] + torch.arange(chunk, device=dev)
        part = scores.view(B, K * V).gather(1, at.view(B, -1)).view(B, k, chunk)
    sums = (part + running.gather(1, beam)[:, :, None]).view(B, k * chunk)
    if n < V:  # and every beam's tail
        sums = torch.cat([sums, (by_beam[:, :, n:] + running[:, :, None]).reshape(B, -1)], dim=1)
    values, j = torch.topk(sums, k)
    c = (j // chunk).clamp(max=k - 1)  # which chosen chunk (clamped: the tails' elements are placed below)
    chosen = beam.gather(1, c) * V + best.gather(1, c) % nc * chunk + j % chunk
    if n == V:
        return values, chosen
    t = j - k * chunk  # past the chunks: the tails, V - n elements per beam
    return values, torch.where(t < 0, chosen, t // (V - n) * V + n + t % (V - n))


@dataclass
class Step:
    """What one step decided for the batch: each slot's new parent (flat rows b * K + k), the tokens the live beams
    took (flat), their scores (B, K), and how many generated tokens each slot's beam shares with its parent."""

    parents: list[int]
    tokens: list[int]
    scores: list[list[float]]
    shared: list[int]
    all_ended: bool = True  # every candidate of every prompt ended (at the last step, or by EOS)


def _advance(batch: list[Prompt], running_scores: torch.Tensor, scores: torch.Tensor, logps: list[torch.Tensor],
             t: int, last: bool, K: int, keep: int, eos: frozenset[int], length_penalty: float,
             take_more: list[bool]) -> Step:
    """One step of transformers' beam search over every prompt of the batch: the top `keep` continuations of the
    K x V scores; the best K that did not end become the live beams, and those of the top K that ended enter the
    finished list (score / (t + 1) ** length_penalty) where take_more says the prompt takes them. The top-k runs
    on the tensors; the rest on the B x keep candidates, in Python (a few dozen small tensor ops cost more)."""
    B, V = len(batch), scores.shape[-1]
    top_scores, top_idx = _top_k(scores, running_scores, keep)
    tok_lps = [lp.view(B, K * V).gather(1, top_idx).tolist() for lp in logps]
    ranked, where = top_scores.tolist(), top_idx.tolist()
    ended_scores = None
    step = Step([], [], [], [])
    for b, p in enumerate(batch):
        alive, ended = [], []
        for r, at in enumerate(where[b]):
            hit = last or (at % V) in eos
            step.all_ended &= hit
            if hit and r < K and take_more[b]:
                ended.append(r)
            elif not hit and len(alive) < K:
                alive.append(r)
            if len(alive) == K and r >= K - 1:  # the rest can neither live nor end (only the top K end)
                break
        if len(alive) < K:  # (fewer than K candidates did not end: a vocabulary smaller than 2K; HF takes the best)
            alive += [r for r in range(keep) if r not in alive][: K - len(alive)]
        if ended:
            if ended_scores is None:
                ended_scores = ranked if length_penalty == 0.0 else \
                    (top_scores[:, :K] / ((t + 1) ** length_penalty)).tolist()
            _finish(p, K, [(ended_scores[b][r], divmod(where[b][r], V), [lp[b][r] for lp in tok_lps])
                           for r in ended])
        order = _stay_in_place([where[b][r] // V for r in alive])
        beams, beam_logps, row_scores = [], [], []
        for slot, child in enumerate(order):
            r = alive[child]
            parent, tok = divmod(where[b][r], V)
            step.shared.append(t if parent == slot else shared_depth(p.beams[slot], p.beams[parent], t))
            beams.append((p.beams[parent], tok))
            beam_logps.append([s + lp[b][r] for s, lp in zip(p.beam_logps[parent], tok_lps)])
            row_scores.append(ranked[b][r])
            step.parents.append(b * K + parent)
            step.tokens.append(tok)
        p.beams, p.beam_logps = beams, beam_logps
        step.scores.append(row_scores)
    return step


def _finish(p: Prompt, K: int, ended: list[tuple[float, tuple[int, int], list[float]]]) -> None:
    """Merge the hypotheses that ended at this step ((score, (parent beam, token), token log-probs), best first)
    into the prompt's best K finished ones, as transformers' top-k over the old and the new does."""
    new = [Finished(score, (p.beams[parent], tok), [s + lp for s, lp in zip(p.beam_logps[parent], tok_lps)])
           for score, (parent, tok), tok_lps in ended]
    p.finished = sorted(p.finished + new, key=lambda h: -h.score)[:K]  # stable: the old first among equal scores


def _stay_in_place(parents: list[int]) -> list[int]:
    """An order of one prompt's K new beams that puts the first child of every parent in the parent's own slot, and
    the other children in the free slots in turn: a beam that continues its parent then keeps its cache row, and
    the reorder moves only the rows whose parent changed. The live beams' order is otherwise immaterial: the best
    live score is taken by max, and finished hypotheses are ranked by score. Returns the child that sits in each
    slot."""
    seen: set[int] = set()
    first = []  # whether each child is its parent's first
    for p in parents:
        first.append(p not in seen)
        seen.add(p)
    free = iter([s for s in range(len(parents)) if s not in seen])  # the slots no first child sits in, in order
    order = [0] * len(parents)
    for child, p in enumerate(parents):
        order[p if first[child] else next(free)] = child
    return order


def _fill_holes(stay: list[bool]) -> list[int]:
    """The prompts that stay, in the order of the batch they make: each keeps its place, and the last ones fill the
    places of those that left (so only their rows move in the caches)."""
    kept = [b for b, s in enumerate(stay) if s]
    late = iter(b for b in kept if b >= len(kept))
    return [b if stay[b] else next(late) for b in range(len(kept))]


def _takes_more(batch: list[Prompt], K: int, early_stopping: bool | str) -> list[bool]:
    """Whether each prompt still takes finished hypotheses: with early_stopping=True, not once it has K."""
    return [early_stopping is not True or len(p.finished) < K for p in batch]


def _still_improvable(batch: list[Prompt], running_scores: torch.Tensor, t: int, max_new: int, K: int,
                      length_penalty: float, early_stopping: bool | str) -> list[bool]:
    """transformers' heuristic: a prompt is done when it has K finished hypotheses and its best live beam cannot beat
    the worst of them (with early_stopping=True, as soon as it has K)."""
    if early_stopping is True:
        return _takes_more(batch, K, early_stopping)
    full = [len(p.finished) == K for p in batch]
    if not any(full):
        return [True] * len(batch)
    best_len = max_new if early_stopping == "never" and length_penalty > 0.0 else t + 1
    best = running_scores.max(dim=1).values
    best = (best if length_penalty == 0.0 else best / (best_len ** length_penalty)).tolist()
    return [not f or b > p.finished[-1].score for f, b, p in zip(full, best, batch)]


def beam_search(
    lock: Lockstep,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    score_fn: ScoreFn,
    length_penalty: float = 0.0,
    early_stopping: bool | str = False,
    monotone: bool = True,
    num_return: int = 1,
) -> list[list[Hypothesis]]:
    """The best `num_return` hypotheses per prompt, best first, each with its score and every model's summed
    log-prob of its tokens (logp: the lockstep's first model; ref_logp: its second, if any), summed as the search
    went (no rescoring).

    score_fn maps the models' next-token log-probs [(N, V), ...] to a per-token score (N, V).
    monotone=True says scores never increase with length (log-probs), which makes the early-stopping
    heuristic exact; for rewards that can be positive it is switched off and search runs until every
    beam has finished or max_new_tokens is reached.
    """
    B, K = len(prompts), num_beams
    if num_return > K:
        raise ValueError("num_return cannot exceed num_beams")
    ids, mask = left_pad(prompts, pad_id)
    dev = lock.device
    eos = frozenset(int(e) for e in eos_ids)
    keep = max(2, 1 + len(eos)) * K  # as HF: enough candidates that K stay alive if the top ones end

    logps = lock.prefill(ids, mask)
    lock.select(torch.arange(B, device=dev).repeat_interleave(K))
    logps = [lp.repeat_interleave(K, dim=0) for lp in logps]
    M = len(logps)
    batch = [Prompt(b, [None] * K, [[0.0] * M for _ in range(K)]) for b in range(B)]
    running = torch.zeros(B, K, device=dev)
    running[:, 1:] = NEG  # only the first copy of the prompt expands at step 0
    done: dict[int, list[Finished]] = {}  # the finished lists of prompts whose search is over (they left the batch)
    for t in range(max_new_tokens):
        last = t + 1 >= max_new_tokens
        step = _advance(batch, running, score_fn(logps).float(), logps, t, last, K, keep, eos, length_penalty,
                        _takes_more(batch, K, early_stopping))
        running = torch.tensor(step.scores, dtype=torch.float32, device=dev)
        if last or step.all_ended:
            break
        stay = _still_improvable(batch, running, t, max_new_tokens, K, length_penalty, early_stopping) \
            if monotone else _takes_more(batch, K, early_stopping)
        if not any(stay):
            break
        parents, tokens, T = step.parents, step.tokens, ids.shape[1]
        starts = [T + d for d in step.shared]  # the prompt and the generated tokens a row shares with its parent
        if not all(stay):  # the prompts that are done leave the batch; their rows cost nothing more
            done.update((p.index, p.finished) for p, s in zip(batch, stay) if not s)
            rows = _fill_holes(stay)
            batch, running = [batch[b] for b in rows], running[torch.tensor(rows, device=dev)]
            parents = [parents[b * K + k] for b in rows for k in range(K)]
            tokens = [tokens[b * K + k] for b in rows for k in range(K)]
            starts = [starts[b * K + k] if b == j else 0 for j, b in enumerate(rows) for k in range(K)]
        lock.select(torch.tensor(parents, device=dev), starts)  # rows of the lockstep as it stood before the step
        logps = lock.step(torch.tensor(tokens, device=dev))

    done.update((p.index, p.finished) for p in batch)
    return [[Hypothesis(tokens_of(h.node), h.score, *h.logps[:2]) for h in done[b][:num_return]
             if h.score > NEG / 2] for b in range(B)]  # (a slot only a NEG-scored copy of the prompt filled)

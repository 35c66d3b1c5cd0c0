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

import torch

from .lm import Lockstep, left_pad

ScoreFn = Callable[[list[torch.Tensor]], torch.Tensor]
NEG = -1.0e9


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
    model_logps: bool = False,
) -> list[list[tuple]]:
    """Best `num_return` (generated tokens, score) per prompt, best first; with model_logps, (tokens, score,
    [log p(tokens | prompt) under each model of the lockstep]), summed as the search went (no rescoring).

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
    eos = torch.tensor(list(eos_ids), device=dev)
    keep = max(2, 1 + len(eos)) * K  # as HF: enough candidates that K stay alive if the top ones end
    top_k_mask = torch.arange(keep, device=dev) < K

    logps = lock.prefill(ids, mask)
    lock.select(torch.arange(B, device=dev).repeat_interleave(K))
    logps = [lp.repeat_interleave(K, dim=0) for lp in logps]

    running = torch.full((B, K, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = NEG  # only the first copy of the prompt expands at step 0
    finished = torch.full((B, K, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    finished_scores = torch.full((B, K), NEG, device=dev)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    M = len(logps)  # every model's summed log-prob of each hypothesis, carried along with it
    running_lp = torch.zeros(B, K, M, device=dev)
    finished_lp = torch.zeros(B, K, M, device=dev)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    batch_offset = torch.arange(B, device=dev)[:, None] * K
    # a prompt whose search is over (nothing it has left can beat its finished hypotheses) leaves the batch: its
    # results are stored here under its original index, and its rows cost nothing more
    prompt_of = torch.arange(B, device=dev)
    done = {"seq": finished.clone(), "scores": finished_scores.clone(), "len": finished_len.clone(),
            "lp": finished_lp.clone()}

    def store(rows: torch.Tensor) -> None:
        at = prompt_of[rows]
        for key, v in (("seq", finished), ("scores", finished_scores), ("len", finished_len), ("lp", finished_lp)):
            done[key][at] = v[rows]

    for t in range(max_new_tokens):
        scores = score_fn(logps).float()
        V = scores.shape[-1]
        acc = (scores.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = torch.topk(acc, keep)
        src_beam = top_idx // V
        tok = top_idx % V
        cand = torch.take_along_dim(running, src_beam[:, :, None], dim=1)
        cand[:, :, t] = tok
        tok_lp = torch.stack([lp.float().view(B, K * V).gather(1, top_idx) for lp in logps], dim=-1)
        cand_lp = torch.take_along_dim(running_lp, src_beam[:, :, None], dim=1) + tok_lp
        hits = torch.isin(tok, eos) | (t + 1 >= max_new_tokens)

        # live beams for the next step: the best K candidates that did not just finish
        alive_scores = top_scores + hits.float() * NEG
        nxt = torch.topk(alive_scores, K).indices
        running = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, nxt, dim=1)
        running_lp = torch.take_along_dim(cand_lp, nxt[:, :, None], dim=1)
        beam_idx = (torch.take_along_dim(src_beam, nxt, dim=1) + batch_offset).view(-1)

        # finished hypotheses: only the top K candidates may enter, scored with the length penalty
        just_done = hits & top_k_mask[None, :]
        done_scores = top_scores / ((t + 1) ** length_penalty)
        done_scores = done_scores + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
        done_scores = done_scores + (~can_improve).float() * NEG + (~just_done).float() * NEG
        m_seq = torch.cat([finished, cand], dim=1)
        m_scores = torch.cat([finished_scores, done_scores], dim=1)
        m_len = torch.cat([finished_len, torch.full_like(tok, t + 1)], dim=1)
        m_fin = torch.cat([is_finished, just_done], dim=1)
        best = torch.topk(m_scores, K).indices
        finished = torch.take_along_dim(m_seq, best[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(m_scores, best, dim=1)
        finished_len = torch.take_along_dim(m_len, best, dim=1)
        finished_lp = torch.take_along_dim(torch.cat([finished_lp, cand_lp], dim=1), best[:, :, None], dim=1)
        is_finished = torch.take_along_dim(m_fin, best, dim=1)

        if monotone:
            # HF's heuristic: stop a prompt when its best live beam cannot beat its worst finished one
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_new_tokens
            else:
                best_len = t + 1
            best_possible = running_scores[:, :1] / (best_len ** length_penalty)
            worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
            can_improve = can_improve & (best_possible > worst).any(-1, keepdim=True)
        all_full = is_finished.all() and early_stopping is True
        if not can_improve.any() or all_full or bool(hits.all()) or t + 1 >= max_new_tokens:
            break
        if not can_improve.all():  # drop the prompts that are done (only a monotone score ends one early)
            over, stay = (~can_improve[:, 0]).nonzero().squeeze(1), can_improve[:, 0].nonzero().squeeze(1)
            store(over)
            beam_idx = beam_idx.view(B, K)[stay].reshape(-1)
            running, running_scores, running_lp = running[stay], running_scores[stay], running_lp[stay]
            finished, finished_scores, finished_len = finished[stay], finished_scores[stay], finished_len[stay]
            finished_lp, is_finished, can_improve = finished_lp[stay], is_finished[stay], can_improve[stay]
            prompt_of = prompt_of[stay]
            B = len(stay)
            batch_offset = torch.arange(B, device=dev)[:, None] * K
        lock.select(beam_idx)
        logps = lock.step(running[:, :, t].reshape(-1))

    store(torch.arange(B, device=dev))
    out = []
    for b in range(len(prompts)):
        hyps = []
        for k in range(num_return):
            if done["scores"][b, k] <= NEG / 2:  # nothing finished for this slot
                continue
            n = int(done["len"][b, k])
            hyp = (done["seq"][b, k, :n].tolist(), float(done["scores"][b, k]))
            hyps.append((*hyp, done["lp"][b, k].tolist()) if model_logps else hyp)
        out.append(hyps)
    return out

"""Per-token credit: which tokens a DPO policy rewards, as plain data (the paper's credit-assignment finding).

For a completion a_0..a_{L-1} (EOS included) of a prompt x, with states s_t = (x, a_<t):

    r_t  = beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))     token reward (Eq. 10, up to V* shaping)
    q_t  = sum_{i<=t} r_i                                      cumulative reward: the implicit Q up to shaping
    R    = q_{L-1} = sum_t r_t                                 sequence reward (what DPO compares)
    step_k = sum of r_t over the tokens of step k              steps end at tokens containing the delimiter, or,
                                                               for conversations, at the end of each message

and for a pair: margin = R_chosen - R_rejected, correct = margin > 0, loss = -log sigmoid(margin).

Scoring goes through the training code paths: `build_pair_batch` / `build_batch` and `completion_logps` for
the log-probs (pairs prefix-shared, one row per pair), `r2q.rewards` for r, q and steps, `dpo_loss` for the
loss, and data rows are tokenised by `r2q.data` exactly as `r2q train` does. The reference log-probs come
from the `r2q train --precompute-ref` cache when it has this data (same key), otherwise from the reference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import refcache
from .credit_config import CreditConfig  # noqa: F401  (re-exported: `from r2q.credit import CreditConfig`)
from .data import (
    DataReport,
    PreferenceExample,
    SFTExample,
    check_fit,
    preference_examples_from_rows,
    sft_examples_from_rows,
)
from .data.read import _read
from .errors import UserError, UserTypeError, check_beta, check_count, listed, note
from .losses import dpo_loss
from .models import check_loaded, check_tokenizer, check_vocab, pad_id, position_limit
from .paths import write_atomic
from .progress import progress_bar
from .reference import CachedReference, LiveReference, NoReference, Reference, batch_slots, cached
from .rewards import (
    aggregate_steps,
    cumulative_rewards,
    implicit_rewards,
    sequence_rewards,
    step_ends_from_text,
    step_rewards,
)
from .shards import Processes
from .tokens import TokenBatch, completion_logps, decode_exact, examples_batch, shared_layout, token_pieces

# ---------------------------------------------------------------------------------------------- results


@dataclass
class CompletionCredit:
    """One scored completion. Every list has one entry per completion token (EOS included): length L.

    rewards[t] = r_t, logps[t] = log pi(a_t|s_t), ref_logps[t] = log pi_ref(a_t|s_t) (None when the
    reference is left out: r_t = beta * log pi), cumulative[t] = q_t. step_rewards[k] is the reward of the
    k-th step, which ends at token step_ends[k] (inclusive). When the completion is a conversation of several
    messages, each message is a step (the paper's per-turn credit) and step_roles[k] is its role; otherwise steps
    are cut at the delimiter and step_roles is None. ''.join(tokens) is the decoded completion.
    """

    row: int
    prompt: str
    text: str
    tokens: list[str]
    token_ids: list[int]
    rewards: list[float]
    logps: list[float]
    ref_logps: list[float] | None
    cumulative: list[float]
    step_rewards: list[float]
    step_ends: list[int]
    reward: float
    step_roles: list[str] | None = None  # conversations: the role of each step (a step is a message, a turn)
    # the implicit process reward model's score of the whole completion from its step rewards: their min (the
    # weakest step, PRIME's best-of-N score), sum (= reward) and last
    prm: dict[str, float] = field(default_factory=dict)


@dataclass
class PairCredit:
    """A scored preference pair; first_diff is the first token index where the completions differ."""

    row: int
    prompt: str
    chosen: CompletionCredit
    rejected: CompletionCredit
    margin: float
    correct: bool
    loss: float
    first_diff: int | None


@dataclass
class TokenStat:
    """A vocabulary token's mean reward over every place it is scored in the data set."""

    token: str
    token_id: int
    mean_reward: float
    count: int


@dataclass
class CreditReport:
    """Credit for a data set: `pairs` (kind "pairs") or `completions` (kind "completions"), with summary
    means (pairs: the `r2q train` metric names loss, rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies) and the tokens with the largest positive and negative mean reward."""

    kind: str
    beta: float
    summary: dict[str, float]
    top_positive: list[TokenStat]
    top_negative: list[TokenStat]
    pairs: list[PairCredit] = field(default_factory=list)
    completions: list[CompletionCredit] = field(default_factory=list)
    ref_source: str = "model"  # "model", "cache" or "none" (reference-free)
    meta: dict[str, Any] = field(default_factory=dict)
    data: DataReport | None = None  # what loading the data file did: rows skipped, cut, identical pairs

    def entries(self) -> list[PairCredit] | list[CompletionCredit]:
        """What a view lists: the pairs, or the completions."""
        return self.pairs if self.kind == "pairs" else self.completions

    def items(self) -> list[CompletionCredit]:
        """Every scored completion: chosen, rejected of each pair in order, or the plain completions."""
        return [c for e in self.entries() for c in completions_of(e)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pairs" if self.kind == "completions" else "completions")
        return d

    def to_json(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))


def completions_of(entry: PairCredit | CompletionCredit) -> tuple[CompletionCredit, ...]:
    """A pair's chosen and rejected completions, or a completion itself."""
    return (entry.chosen, entry.rejected) if isinstance(entry, PairCredit) else (entry,)


# ---------------------------------------------------------------------------------------------- text


def _token_text(tokenizer, tid: int) -> str:
    """A vocabulary entry as text: decoded, or its raw form when it is only part of a character."""
    text = decode_exact(tokenizer, [tid])
    return str(tokenizer.convert_ids_to_tokens(tid)) if "\ufffd" in text else text


def _prompt_text(tokenizer, ids: Sequence[int]) -> str:
    ids = list(ids)
    if tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]  # the BOS that tokenisation adds is not the user's text
    return decode_exact(tokenizer, ids)


# ---------------------------------------------------------------------------------------------- scoring


def _reference(ref, tokenizer, examples, ref_logps, use_cache: bool, cache_dir) -> Reference:
    """The reference as credit scores with it: given rows, else the training cache when it has this data, else the
    model run live; none for the reference-free reward."""
    if isinstance(ref, Reference):
        return ref
    if ref_logps is not None:
        n = len(refcache.completion_sequences(examples))
        if len(ref_logps) != n:
            raise ValueError(f"{len(ref_logps)} reference rows for {n} completions")
        return CachedReference([r.float().cpu() for r in ref_logps])
    if ref is None:
        return NoReference()
    check_loaded(ref, "ref")
    if use_cache:
        hit = cached(refcache.cache_path(cache_dir, refcache.weights_hash(ref), tokenizer, examples), examples)
        if hit is not None:
            return hit
    return LiveReference(ref)


@torch.no_grad()
def score_examples(
    policy, ref, tokenizer, examples: Sequence[PreferenceExample] | Sequence[SFTExample], beta: float, *,
    delimiter: str | None = "\n", batch_size: int = 16, share_prefix: bool = True,
    ref_logps: Sequence[torch.Tensor] | None = None, use_cache: bool = True, cache_dir: str | Path | None = None,
    progress: bool = False, top_k: int = 20, min_count: int | None = None, procs: Processes | None = None,
) -> CreditReport:
    """Credit for tokenised examples (all PreferenceExample or all SFTExample).

    ref: a model, a `r2q.reference.Reference`, or None for the reference-free reward r_t = beta * log pi.
    ref_logps: per-token reference log-probs in the cache's order ([chosen_0, rejected_0, chosen_1, ...] or one
    per completion); when not given and use_cache, the training cache in cache_dir (default $R2Q_CACHE) is looked
    up, then ref is run.
    Each batch of B pairs is one (B, T) prefix-shared row block giving (2B, L) completion-aligned log-probs.
    procs: the processes scoring together (`r2q.shards.processes()` under torchrun / accelerate launch; every one
    must call): each scores every N-th batch and all return the whole report. Default: this process alone.
    """
    _check_arguments(policy, tokenizer, beta, batch_size, delimiter)
    if isinstance(examples, (str, bytes)) or not examples:
        raise UserError("there is nothing to score" if not examples else "examples must be a list of examples")
    pairs = isinstance(examples[0], PreferenceExample)
    seqs = refcache.completion_sequences(examples)
    reference = _reference(ref, tokenizer, examples, ref_logps, use_cache, cache_dir)
    check_vocab(tokenizer, policy, reference.model)
    check_fit(examples, position_limit(policy, reference.model))
    pad = pad_id(tokenizer)
    per = 2 if pairs else 1
    share_prefix = shared_layout(share_prefix, policy, reference.model, say=note)
    pieces = [token_pieces(tokenizer, c, p) for p, c in seqs]
    turns = [turn_steps(pieces[s], (examples[s // per].turns or [None] * per)[s % per]) for s in range(len(seqs))]
    # length-sorted batches pad little; results go back to their slots
    order = sorted(range(len(examples)), key=lambda i: len(seqs[per * i][0]) + sum(len(c) for _, c in
                                                                                   seqs[per * i : per * i + per]))
    starts = range(0, len(order), batch_size)
    procs = procs or Processes()
    done: dict[int, tuple[list[tuple[int, CompletionCredit]], dict[int, float]]] = {}
    with _eval_mode(policy, reference.model), progress_bar(progress and procs.is_main, transient=True) as bar:
        task = bar.add_task("credit", total=len(examples), info="")
        for k in procs.mine(len(starts)):
            idx = order[starts[k] : starts[k] + batch_size]
            b = examples_batch([examples[i] for i in idx], pad, share_prefix)
            slots = batch_slots(idx, pairs)  # batch rows: chosen..., rejected... (pairs) or one per completion
            ref_lp = reference.logps(b, slots)
            if ref_lp is not None and torch.isnan(ref_lp).any():
                raise UserError("the reference gives NaN log-probs for this batch: its weights (or dtype) are damaged")
            made, R = _credits(b, _logps(policy, b), None if ref_lp is None else ref_lp.float().cpu(), beta,
                               [pieces[s] for s in slots], delimiter, [turns[s] for s in slots])
            comps = [(s, CompletionCredit(row=examples[s // per].row, prompt=_prompt_text(tokenizer, seqs[s][0]),
                                          text="".join(tokens), tokens=tokens, token_ids=list(seqs[s][1]), **fields))
                     for s, (tokens, fields) in zip(slots, made)]
            loss = dict(zip(idx, dpo_loss(R[: len(idx)], R[len(idx) :], beta).tolist())) if pairs else {}
            done[k] = comps, loss
            bar.advance(task, len(idx) * procs.world)
    out: list[CompletionCredit] = [None] * len(seqs)  # type: ignore[list-item]
    pair_loss: dict[int, float] = {}
    for comps, loss in procs.merge(done).values():
        for s, c in comps:
            out[s] = c
        pair_loss.update(loss)
    return _report(tokenizer, examples, out, pair_loss, beta, reference.kind, top_k, min_count)


def _check_arguments(policy, tokenizer, beta, batch_size=16, delimiter: str | None = "\n") -> None:
    """The arguments every credit entry point takes, checked before any text is tokenised."""
    check_beta(beta)
    check_loaded(policy)
    check_tokenizer(tokenizer)
    check_count(batch_size, "batch_size")
    if delimiter is not None and not isinstance(delimiter, str):
        raise UserTypeError(f"delimiter must be a string (or None: no steps); got {type(delimiter).__name__} "
                            f"{delimiter!r}")


@contextmanager
def _eval_mode(*models):
    """The models in eval mode (no dropout) for the block, each put back in its own mode after."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _report(tokenizer, examples, comps: list[CompletionCredit], pair_loss: dict[int, float], beta: float,
            ref_source: str, top_k: int, min_count: int | None) -> CreditReport:
    pairs = isinstance(examples[0], PreferenceExample)
    top_pos, top_neg = top_tokens(tokenizer, comps, top_k, min_count)
    report = CreditReport("pairs" if pairs else "completions", beta, {}, top_pos, top_neg, ref_source=ref_source)
    if pairs:
        for i, e in enumerate(examples):
            c, r = comps[2 * i], comps[2 * i + 1]
            report.pairs.append(PairCredit(e.row, c.prompt, c, r, c.reward - r.reward, c.reward > r.reward,
                                           pair_loss[i], _first_diff(c.token_ids, r.token_ids)))
    else:
        report.completions = comps
    report.summary = summarize(report)
    return report


def _logps(model, b: TokenBatch) -> torch.Tensor:
    lp = completion_logps(model, b.to(model.device)).float().cpu()
    if torch.isnan(lp).any():  # damaged weights give NaN everywhere; a report of NaN rewards would be no answer
        raise UserError(f"{getattr(model.config, '_name_or_path', '') or 'a model'} gives NaN log-probs for this "
                        "batch: its weights (or dtype) are damaged")
    return lp


def turn_steps(pieces: Sequence[str], turns) -> tuple[list[bool], list[str]] | None:
    """A conversational completion of several messages as steps: which tokens end a message (its last token, the
    one whose text reaches the message's end) and each message's role; None for one message or no turns."""
    if not turns or len(turns) < 2:
        return None
    ends, reached, k = [False] * len(pieces), 0, 0
    for t, piece in enumerate(pieces):
        reached += len(piece)  # characters of the completion's text up to the end of token t
        while k < len(turns) - 1 and reached >= turns[k][1]:
            ends[t] = True  # this token reaches the end of message k (a token spanning two ends closes both)
            k += 1
    roles = [r for r, _ in turns]
    n_steps = sum(ends) + (not ends or not ends[-1])  # a completion cut short keeps the messages it reaches
    return ends, roles[:n_steps]


def _credits(b: TokenBatch, pol, ref_lp, beta, texts, delimiter, turns=None
             ) -> tuple[list[tuple[list[str], dict]], torch.Tensor]:
    """Per-completion fields of one batch from the (S, L) tensors of `r2q.rewards` (rewards computed once), and
    the (S,) sequence rewards. Steps are messages where `turns` gives them (turn_steps), else cut at delimiter."""
    mask = b.completion_mask()
    r = implicit_rewards(pol, ref_lp, mask, beta)
    q = cumulative_rewards(r, mask)
    R = sequence_rewards(r, mask)
    if delimiter:
        ends = step_ends_from_text(texts, delimiter)
        ends = torch.nn.functional.pad(ends, (0, b.max_len - ends.shape[1]))
    else:
        ends = torch.zeros_like(mask)
    turns = turns or [None] * len(texts)
    for row, ts in enumerate(turns):
        if ts is not None:
            ends[row] = False
            ends[row, : len(ts[0])] = torch.tensor(ts[0], dtype=torch.bool)
    steps, step_mask = step_rewards(r, ends, mask)
    prm = {how: aggregate_steps(steps, step_mask, how).tolist() for how in ("min", "sum", "last")}
    made = []
    for row in range(len(texts)):
        n = int(b.lengths[row])
        k = int(step_mask[row].sum())
        marks = [t for t in range(n) if ends[row, t]]
        made.append((texts[row], dict(
            rewards=r[row, :n].tolist(), logps=pol[row, :n].tolist(),
            ref_logps=None if ref_lp is None else ref_lp[row, :n].tolist(), cumulative=q[row, :n].tolist(),
            step_rewards=steps[row, :k].tolist(), step_ends=(marks + [n - 1])[:k], reward=float(R[row]),
            step_roles=None if turns[row] is None else turns[row][1][:k],
            prm={how: v[row] for how, v in prm.items()})))
    return made, R


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(report: CreditReport) -> dict[str, float]:
    """Means over the data set. Pairs use the `r2q train` metric names, so the numbers compare directly."""
    items = report.items()
    n_tok = sum(len(c.rewards) for c in items)
    s: dict[str, float] = {"rewards/token_mean": sum(sum(c.rewards) for c in items) / max(n_tok, 1)}
    if report.kind == "pairs":
        P = report.pairs
        n = len(P)
        s.update({"loss": sum(p.loss for p in P) / n, "rewards/chosen": sum(p.chosen.reward for p in P) / n,
                  "rewards/rejected": sum(p.rejected.reward for p in P) / n,
                  "rewards/margins": sum(p.margin for p in P) / n, "rewards/accuracies": sum(p.correct for p in P) / n,
                  "pairs": n})
    else:
        s.update({"rewards/mean": sum(c.reward for c in items) / len(items), "completions": len(items)})
    return s


def top_tokens(tokenizer, items: Sequence[CompletionCredit], k: int = 20,
               min_count: int | None = None) -> tuple[list[TokenStat], list[TokenStat]]:
    """The k tokens with the largest positive and the k with the largest negative mean reward.

    mean(v) = sum of r_t over scored positions with a_t = v / their count, over tokens seen at least
    min_count times (default: 3 for data sets of 20 or more completions, else 1).
    """
    if min_count is None:
        min_count = 3 if len(items) >= 20 else 1
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for c in items:
        for tid, r in zip(c.token_ids, c.rewards):
            sums[tid] = sums.get(tid, 0.0) + r
            counts[tid] = counts.get(tid, 0) + 1
    stats = [TokenStat(_token_text(tokenizer, t), t, sums[t] / counts[t], counts[t]) for t in sums
             if counts[t] >= min_count]
    pos = sorted((s for s in stats if s.mean_reward > 0), key=lambda s: -s.mean_reward)[:k]
    neg = sorted((s for s in stats if s.mean_reward < 0), key=lambda s: s.mean_reward)[:k]
    return pos, neg


# ---------------------------------------------------------------------------------------------- front doors


def score_pairs(policy, ref, tokenizer, rows: Sequence[Mapping], beta: float, *, max_length: int = 1024,
                max_prompt_length: int = 512, skip_bad: bool = False, **kw) -> CreditReport:
    """Credit for preference rows in any format `r2q train` reads ({"prompt", "chosen", "rejected"}, messages).
    kw: as `score_examples` (delimiter, batch_size, share_prefix, use_cache, cache_dir, progress, ...)."""
    examples, _ = preference_examples_from_rows(listed(rows, "rows"), tokenizer, max_length, max_prompt_length,
                                                skip_bad)
    return score_examples(policy, ref, tokenizer, examples, beta, **kw)


def score_texts(policy, ref, tokenizer, prompts: Sequence[str], completions: Sequence[str], beta: float, *,
                delimiter: str | None = "\n", max_length: int = 1024, max_prompt_length: int = 512,
                **kw) -> CreditReport:
    """Credit for plain (prompt, completion) strings, tokenised as in training (completion + EOS)."""
    _check_arguments(policy, tokenizer, beta, kw.get("batch_size", 16), delimiter)
    prompts, completions = listed(prompts, "prompts"), listed(completions, "completions")
    if len(prompts) != len(completions):
        raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    examples, data_report = sft_examples_from_rows(rows, tokenizer, max_length, max_prompt_length,
                                                   source="the texts given", unit="texts")
    report = score_examples(policy, ref, tokenizer, examples, beta, delimiter=delimiter, **kw)
    report.data = data_report  # what was cut to max_length / max_prompt_length, as for a file
    return report


def credit_from_file(policy, ref, tokenizer, path: str | Path, beta: float, *, max_length: int = 1024,
                     max_prompt_length: int = 512, skip_bad: bool = False, split: str = "train", subset: str = "",
                     **kw) -> CreditReport:
    """Credit for a data file: preference pairs if its first row has 'chosen' and 'rejected', else
    completions (prompt/completion, text or messages rows). kw: as `score_examples`."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserTypeError(f"path must be a data file, directory or hub name (a str or a Path); got "
                            f"{type(path).__name__}")
    _check_arguments(policy, tokenizer, beta, kw.get("batch_size", 16), kw.get("delimiter", "\n"))
    source, unit, items = _read(path, split, subset)  # rows that fail to parse stay in, for skip_bad to count
    first = next((r for _, r in items if isinstance(r, Mapping)), {})
    pairs = "chosen" in first and "rejected" in first
    load: Callable = preference_examples_from_rows if pairs else sft_examples_from_rows
    examples, data_report = load(items, tokenizer, max_length, max_prompt_length, skip_bad, source=source, unit=unit,
                                 progress=kw.get("progress", False))
    report = score_examples(policy, ref, tokenizer, examples, beta, **kw)
    report.meta["data"] = data_report.summary()
    report.data = data_report
    return report

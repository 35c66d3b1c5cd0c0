"""The demo's text: IMDb reviews split into the gold reward's, the LMs' and the held-out search prompts' parts, a BPE
tokenizer, and the gold reward (see Profile.data_seed: these stages do not change with the seeds). No model is
trained or decoded here, so an edit to the trainer or to search does not make the text again."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..tasks.imdb_sentiment import (
    GoldReward,
    load_reviews,
    passages,
    rt_pairs,
    save_gold,
    sentences,
    split_reviews,
)
from ..toy import train_bpe_tokenizer
from .common import percentiles, read_jsonl, write_jsonl


def passage_prompt(tok, text: str, k: int) -> tuple[str, str]:
    """(BOS + the passage's first k tokens, the rest of the passage) as text."""
    ids = tok(text, add_special_tokens=False).input_ids
    return tok.bos_token + tok.decode(ids[:k]), tok.decode(ids[k:])


def _sentence_counter(tok, texts: list[str]):
    """n_tokens(passage) for passages of whole sentences of `texts`, from every sentence's token count encoded once
    in a batch: a byte-level BPE cuts before a space, so a passage's tokens are its first sentence's plus each later
    sentence's with its leading space (the passages made are checked against a real encoding afterwards)."""
    sents = sorted({x for t in texts for x in sentences(t)})
    enc = tok.backend_tokenizer.encode_batch
    first = dict(zip(sents, (len(e.ids) for e in enc(sents, add_special_tokens=False))))
    later = dict(zip(sents, (len(e.ids) for e in enc([" " + x for x in sents], add_special_tokens=False))))

    def n_tokens(passage: str) -> int:
        parts = sentences(passage)
        return first[parts[0]] + sum(later[x] for x in parts[1:])

    return n_tokens


def _check_fits(tok, texts: list[str], max_tokens: int) -> None:
    lengths = [len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    if max(lengths, default=0) > max_tokens:
        raise AssertionError(f"a passage of {max(lengths)} tokens was made for a limit of {max_tokens}")


def stage_data(ctx, d: Path) -> dict[str, Any]:
    """Reviews split into gold / held-out / LM text; a BPE tokenizer; the LM's and the judge's passages; the
    prompts of pairs and search (each the start of a passage of a review no LM learns from); Rotten Tomatoes."""
    p = ctx.profile
    # twice the held-out reviews the search needs: some have no passage long enough for a prompt and a continuation
    splits = split_reviews(load_reviews("imdb"), p.n_gold, 2 * p.n_search, p.data_seed)
    lm = splits.lm[: p.n_lm_reviews]
    tok = train_bpe_tokenizer(lm, vocab_size=p.vocab, chat_template=None)
    tok.save_pretrained(d / "tokenizer")
    rng = random.Random(p.data_seed)
    n_tokens = _sentence_counter(tok, lm + [t for t, _ in splits.gold] + splits.prompts)

    def cut(texts: list[str]) -> list[list[str]]:
        return [passages(t, n_tokens, p.lm_len - 2, rng, p.sentences) for t in texts]

    lm_passages = [x for ps in cut(lm) for x in ps]
    _check_fits(tok, lm_passages, p.lm_len - 2)
    write_jsonl(d / "lm.jsonl", [{"text": x} for x in lm_passages])
    write_jsonl(d / "gold.jsonl", [{"text": t, "label": y} for t, y in splits.gold])
    gold_passages = cut([t for t, _ in splits.gold])
    _check_fits(tok, [x for ps in gold_passages for x in ps], p.lm_len - 2)
    # the judge learns passages of the gold reviews, text it shares with no policy
    write_jsonl(d / "judge.jsonl", [{"text": x} for ps in gold_passages for x in ps])
    need = max(p.eos_prompt_tokens + (p.prompt_tokens,)) + 4  # room for a continuation after the longest prompt

    def one_passage(ps: list[str]) -> str | None:  # a random passage long enough to hold a prompt
        ok = [x for x in ps if n_tokens(x) >= need]
        return rng.choice(ok) if ok else None

    pair = [x for x in map(one_passage, gold_passages) if x is not None]
    if len(pair) < p.n_pair_prompts:
        raise UserError(f"profile asks for {p.n_pair_prompts} pair prompts; the gold reviews give {len(pair)}")
    write_jsonl(d / "pair_prompts.jsonl", [{"prompt": passage_prompt(tok, x, p.prompt_tokens)[0]}
                                           for x in pair[: p.n_pair_prompts]])
    held = [x for x in map(one_passage, cut(splits.prompts)) if x is not None][: p.n_search]
    if len(held) < p.n_search:
        raise UserError(f"profile asks for {p.n_search} search prompts; the held-out reviews give {len(held)}")
    search = []
    for x in held:  # the prompt and the human rest of the same passage, which ends there
        prompt, human = passage_prompt(tok, x, p.prompt_tokens)
        search.append({"prompt": prompt, "human": human, "passage": x})
    write_jsonl(d / "search_prompts.jsonl", search)
    write_jsonl(d / "rt_snippets.jsonl", rt_pairs(load_reviews("rotten_tomatoes"), p.rt_candidates, p.data_seed))
    lengths = [n_tokens(x) for x in lm_passages[:4000]]
    return {"lm_reviews": len(lm), "lm_passages": len(lm_passages), "passage_tokens": percentiles(lengths),
            "gold_reviews": len(splits.gold), "pair_prompts": p.n_pair_prompts, "search_prompts": len(search),
            "vocab": len(tok)}


def stage_gold(ctx, d: Path) -> dict[str, Any]:
    rows = read_jsonl(ctx.dir("data") / "gold.jsonl")
    gold = GoldReward([(r["text"], r["label"]) for r in rows], seed=ctx.profile.data_seed)
    save_gold(gold, d / "gold.json")
    return {"test_accuracy": gold.test_accuracy, "features": len(gold.weights)}

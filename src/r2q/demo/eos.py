"""The check that the SFT policy ends its texts by content, not by position (it samples from the policy, so it is
the first shared stage that runs search code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..models import load_model, load_tokenizer
from ..search import GenerateConfig, generate
from ..stats import mean_ci
from .common import percentiles, read_jsonl
from .text import passage_prompt


def stage_eos(ctx, d: Path) -> dict[str, Any]:
    """Does the SFT policy end by content? Temperature-1 samples after prompts of several lengths cut from the same
    held-out passages: if EOS were taught by position, prompt + output would sit at one length whatever the prompt;
    ended by content, most samples end (EOS) and prompt + output spreads as passages do."""
    p, sft = ctx.profile, ctx.dir("sft") / "model"
    tok, model = load_tokenizer(sft), load_model(sft).eval()
    rows = read_jsonl(ctx.dir("data") / "search_prompts.jsonl")[: p.n_eos_prompts]
    out: dict[str, Any] = {"prompts": len(rows), "max_new_tokens": p.search_tokens, "lm_len": p.lm_len, "by_prompt": []}
    for k in p.eos_prompt_tokens:
        prompts = [passage_prompt(tok, r["passage"], k)[0] for r in rows]
        cfg = GenerateConfig(method="sample", max_new_tokens=p.search_tokens, seed=p.data_seed, batch_size=256)
        gens, _ = generate(model, tok, prompts, cfg)
        n = np.array([len(g.token_ids) for g in gens])
        ended = np.array([bool(g.token_ids) and g.token_ids[-1] == tok.eos_token_id for g in gens])
        total = n + k + 1  # BOS, the prompt's k tokens, the output
        out["by_prompt"].append({"prompt_tokens": k, "eos": mean_ci(ended, p.n_boot), "output": percentiles(n),
                                 "total": percentiles(total), "total_mean": float(total.mean()),
                                 "total_sd": float(total.std()),
                                 "total_in_last_8": float(np.mean((total > p.lm_len - 8) & (total <= p.lm_len)))})
    return out

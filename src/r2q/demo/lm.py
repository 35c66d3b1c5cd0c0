"""The LMs every seed shares, trained from scratch on the demo's text: the SFT policy and the fluency judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import load_tokenizer
from ..toy import save_model, tiny_model
from ..train import TrainConfig, train


def _lm(ctx, d: Path, rows: str, layers: int, steps: int, seed: int) -> dict[str, Any]:
    """A small Llama-style LM trained from scratch on passages (`r2q sft` on {"text"} rows), 5% held out."""
    p, data = ctx.profile, ctx.dir("data")
    tok = load_tokenizer(data / "tokenizer")
    init = save_model(tiny_model("llama", len(tok), seed=seed, hidden=p.hidden, layers=layers, heads=p.heads,
                                 max_positions=256), tok, d / "init")
    cfg = TrainConfig(model=str(init), data=str(data / rows), out=str(d / "model"), lr=p.sft_lr, schedule="cosine",
                      warmup_steps=max(1, steps // 20), max_steps=steps, eval_fraction=0.05, batch_size=p.sft_batch,
                      max_length=p.lm_len, max_prompt_length=8, seed=seed, quiet=ctx.quiet, weight_decay=0.01,
                      eval_every=max(1, steps // 5), overwrite=True)
    res = train(cfg, mode="sft")
    tr = [m for m in res.metrics if m["split"] == "train"][-1]
    ev = [m for m in res.metrics if m["split"] == "eval"]
    # the held-out curve sizes the steps: still falling at the end means under-trained, rising means memorised
    return {"params": sum(x.numel() for x in res.model.parameters()), "train_ppl": tr["ppl"],
            "heldout_ppl": ev[-1]["ppl"], "heldout_ppl_curve": [[m["step"], m["ppl"]] for m in ev],
            "heldout_ppl_best_step": min(ev, key=lambda m: m["ppl"])["step"], "steps": res.steps, "lr": p.sft_lr,
            "batch": p.sft_batch}


def stage_sft(ctx, d: Path) -> dict[str, Any]:
    p = ctx.profile
    return _lm(ctx, d, "lm.jsonl", p.layers, p.sft_steps, p.data_seed)


def stage_judge(ctx, d: Path) -> dict[str, Any]:
    p = ctx.profile
    return _lm(ctx, d, "judge.jsonl", p.judge_layers, p.judge_steps, p.data_seed + 7)

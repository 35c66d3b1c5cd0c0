"""What `r2q generate` and `r2q credit` do once their options are parsed: check the inputs, load the models, run,
write the outputs. The engines (torch, transformers) are imported inside each function, so importing this module
costs the command line nothing at start-up."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from .config import check_attention
from .errors import UserError, note
from .paths import check_out_file, check_outputs_spare_inputs, write_atomic
from .record import read_record, reference_changed
from .search.config import GenerateConfig, check_models


def quiet_transformers() -> None:
    """transformers' logs below errors and its progress bars off: each command calls this where it starts loading
    the engines (importing transformers takes half a second, so not before the options are checked)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # (a failed hub request is the command's one-line error, not a log line too)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per line; blank lines are skipped, and said) or data with a `prompt` field
    (strings or messages): a data file, or a data set directory."""
    from .data import read_rows, read_text

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".txt" and path.is_file():
        lines = read_text(path).splitlines()
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise UserError(f"{path}: no prompts")
        if len(prompts) < len(lines):
            blank = len(lines) - len(prompts)
            note(f"{path}: {blank} blank line{'s' * (blank != 1)} skipped; {len(prompts)} prompts, one output line "
                 "each")
        return prompts
    prompts = []
    for n, row in read_rows(path):
        if "prompt" not in row:
            raise UserError(f"{path} row {n}: no 'prompt' field (its fields: {', '.join(map(str, row)) or 'none'})")
        p = row["prompt"]
        if not isinstance(p, (str, list)):  # a list of messages is checked, and rendered, by the search
            raise UserError(f"{path} row {n}: field 'prompt' must be a string or a list of chat messages")
        prompts.append(p)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def run_generate(cfg: GenerateConfig, model: str, prompts: Path, out_path: Path, ref: str, base: str, dtype: str,
                 attn_implementation: str, quiet: bool, trust_remote_code: bool, console: Console) -> None:
    """`r2q generate`: check, read the prompts, load the models, decode, write one line per prompt."""
    check_models(cfg, ref or None, base or None)  # before loading: it asks only whether each model is given
    check_attention(attn_implementation)
    check_out_file(out_path, "--out")
    check_outputs_spare_inputs([("--out", out_path)], files=[("--prompts", prompts)],
                               dirs=[("--model", model), ("--ref", ref), ("--base", base)])
    texts = read_prompts(prompts)
    quiet_transformers()
    from .models import check_model_path, check_vocab, load_model, load_reference, load_tokenizer

    for path, what in ((model, "model"), (ref, "reference"), (base, "base")):  # all, before any is loaded
        if path:
            check_model_path(path, what)
    from .search import generate
    from .shards import processes

    procs = processes()  # under torchrun / accelerate launch: every process decodes its share of the batches
    tok = load_tokenizer(model, trust_remote_code)
    policy = load_model(model, dtype, trust_remote_code, attn_implementation)
    check_vocab(tok, policy)
    if ref and (changed := reference_changed(_record_if_readable(model), ref)) is not None:
        note(changed)
    others = {name: load_reference(path, tok, policy, dtype, trust_remote_code, name, attn_implementation)
              for name, path in (("reference", ref), ("base", base)) if path}
    results, total = generate(policy, tok, texts, cfg, ref=others.get("reference"), base=others.get("base"),
                              progress=not quiet, procs=procs)
    if procs.is_main:  # one output file, from the first process
        write_atomic(out_path, "".join(json.dumps(dict(r.as_dict(), method=cfg.method)) + "\n" for r in results))
        console.print(f"{len(results)} generations written to {out_path}; compute: "
                      + ", ".join(f"{k} {v}" for k, v in total.items()), highlight=False, markup=False)
    procs.finish()


def _record_if_readable(model: str):
    """The model's run record for a note, or None where it is damaged (generate needs nothing else from it)."""
    try:
        return read_record(model)
    except UserError:
        return None


def _credit_inputs(cfg) -> tuple[str, float]:
    """credit's options checked before anything loads; returns the reference and beta, defaulting to what
    `r2q train` recorded with the model (and noting when that reference has changed since), else beta 0.1."""
    if not cfg.model:
        raise UserError("--model is required")
    texts = cfg.prompt is not None or cfg.response is not None
    if bool(cfg.data) == texts:
        raise UserError("give either --data FILE or --prompt TEXT with --response TEXT")
    if texts and (cfg.prompt is None or cfg.response is None):
        raise UserError(f"{'--response' if cfg.prompt is None else '--prompt'} is given without "
                        f"{'--prompt' if cfg.prompt is None else '--response'}: they go together")
    try:
        rec = read_record(cfg.model)
    except UserError as e:  # a damaged record: what it would have given was given on the command line
        if not (cfg.ref and cfg.beta is not None):
            raise
        note(f"{e} (doing so)")
        rec = None
    ref = cfg.ref or (rec.reference() if rec else "")
    if not ref:
        raise UserError("--ref is required (the model has no r2q_config.json naming its reference)")
    outputs = [(flag_name, path) for flag_name, path in (("--html", cfg.html), ("--json", cfg.json),
                                                          ("--png", cfg.png)) if path]
    for flag_name, path in outputs:
        check_out_file(path, flag_name)
    check_outputs_spare_inputs(outputs, files=[("--data", cfg.data)],
                               dirs=[("--model", cfg.model), ("--ref", "" if ref == "none" else ref)])
    if (changed := reference_changed(rec, ref)) is not None:
        note(changed)
    return ref, cfg.beta if cfg.beta is not None else (rec.beta() if rec else None) or 0.1


def _write_credit(report, cfg, console: Console) -> None:
    from .views.html import write_html
    from .views.plots import plot_credit

    written = []
    if cfg.json:
        written.append(report.to_json(cfg.json))
    if cfg.html:
        written.append(write_html(report, cfg.html))
    if cfg.png:
        written.append(plot_credit(report, cfg.png))
    for p in written:
        console.print(f"wrote {p}", highlight=False, markup=False)


def run_credit(cfg, console: Console | None = None) -> dict:
    """`r2q credit`: check, load, score, print the terminal view, write the requested files; returns the JSON
    dict. --ref / --beta default to what `r2q train` recorded with the model, else beta 0.1."""
    console = console or Console()
    ref, beta = _credit_inputs(cfg)
    quiet_transformers()
    import torch

    from .credit import credit_from_file, score_texts
    from .models import check_vocab, load_model, load_reference, load_tokenizer
    from .views.terminal import render_terminal

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    policy = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, cfg.attn_implementation)
    check_vocab(tokenizer, policy)
    ref_model = None if ref == "none" else load_reference(ref, tokenizer, policy, cfg.dtype, cfg.trust_remote_code,
                                                          attn=cfg.attn_implementation)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m in (policy, ref_model):
        if m is not None:
            m.to(device)
    from .shards import processes

    procs = processes()  # under torchrun / accelerate launch: every process scores its share of the batches
    kw = dict(procs=procs, delimiter=cfg.delimiter, batch_size=cfg.batch_size, share_prefix=cfg.share_prefix,
              cache_dir=cfg.cache_dir or None, progress=not cfg.quiet, top_k=cfg.top_k,
              min_count=cfg.min_count or None, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    if cfg.data:
        report = credit_from_file(policy, ref_model, tokenizer, cfg.data, beta, skip_bad=cfg.skip_bad,
                                  split=cfg.split, subset=cfg.subset, **kw)
    else:
        report = score_texts(policy, ref_model, tokenizer, [cfg.prompt], [cfg.response], beta, **kw)
    for line in report.data.notes() if procs.is_main and report.data is not None else ():
        note(line)  # rows skipped, prompts or completions cut to --max-prompt-length / --max-length
    report.meta.update(model=str(cfg.model), ref=str(ref), data=report.meta.get("data", "--prompt/--response"))
    if procs.is_main:  # one view and one set of files, from the first process
        render_terminal(report, console, max_items=cfg.show)
        _write_credit(report, cfg, console)
    procs.finish()
    return report.to_dict()

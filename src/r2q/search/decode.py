"""`generate`: prompts in, one `Hypothesis` per prompt out, with the compute spent, for every method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..config import flag
from ..data import encode_prompt
from ..errors import UserError, UserTypeError, listed
from ..models import check_loaded, check_vocab, has_head, pad_id, position_limit, vocab_size
from ..progress import progress_bar
from ..rewards import sequence_rewards, token_rewards
from ..shards import Processes
from ..tokens import build_batch, completion_logps
from .bon import load_external_scorer
from .config import WIDTH, GenerateConfig, check_models
from .hypothesis import Hypothesis
from .lm import Compute, free_memory, kv_bytes_per_token
from .methods import MAX_WIDTH, REGISTRY, Job

__all__ = ["MAX_WIDTH", "check_memory", "check_room", "cost_per_prompt", "decoding_rows", "encode_prompts", "generate",
           "generate_ids", "score_sequences", "sequence_logps", "with_budget"]


def cost_per_prompt(cfg: GenerateConfig, prompt_len: float, with_ref: bool) -> tuple[float, float]:
    """(a, b): a prompt of prompt_len tokens costs at most a + b * width tokens processed (every model's forward
    positions, as `Compute` counts them, rescoring included), reached when no output ends before
    --max-new-tokens. Width is WIDTH[cfg.method]; b = 0 for methods without one (see `methods.REGISTRY`)."""
    return REGISTRY[cfg.method].cost(cfg, prompt_len, with_ref)


def decoding_rows(cfg: GenerateConfig, prompts: int) -> int:
    """Rows decoded side by side for `prompts` prompts (each row holds a KV cache and next-token log-probs)."""
    return prompts * REGISTRY[cfg.method].rows(cfg)


def with_budget(cfg: GenerateConfig, prompt_len: float, with_ref: bool) -> GenerateConfig:
    """cfg with its width (WIDTH) set to the largest whose worst-case cost per prompt fits cfg.budget."""
    a, b = cost_per_prompt(cfg, prompt_len, with_ref)
    width = int((cfg.budget - a) // b) if b else 0
    if width < 1:
        raise UserError(f"--budget {cfg.budget} is below the cost of the narrowest {cfg.method} "
                        f"({a + b:.0f} tokens per prompt here)")
    top = MAX_WIDTH[cfg.method]
    if width > top:
        raise UserError(f"--budget {cfg.budget:,} would set {cfg.method}'s {flag(WIDTH[cfg.method])} to {width:,}; "
                        f"r2q runs at most {top:,}, which a budget of {a + b * top:,.0f} tokens per prompt buys here")
    return replace(cfg, **{WIDTH[cfg.method]: width})


def check_memory(cfg: GenerateConfig, models: Sequence, prompt_len: int, prompts: int) -> None:
    """Refuse, before anything is allocated, a search whose caches and logits would not fit in the memory free on
    the device: one line with the estimate and what to lower."""
    free = free_memory(next(models[0].parameters()).device)
    if free is None:
        return
    positions = prompt_len + cfg.max_new_tokens
    per_row = sum(kv_bytes_per_token(m) * positions + 4 * 4 * vocab_size(m) for m in models)
    need = decoding_rows(cfg, min(prompts, cfg.batch_size)) * per_row
    if need > 0.9 * free:
        width = f" with {flag(WIDTH[cfg.method])} {cfg.width}" if cfg.width is not None else ""
        raise UserError(f"--method {cfg.method}{width} and --batch-size {cfg.batch_size} would need about "
                        f"{need / 1e9:.1f} GB for caches and logits; {free / 1e9:.1f} GB are free: lower the width, "
                        "--budget or --batch-size")


def reference_model(ref):
    """The module search steps as pi_ref: `ref` itself when it is a model (or None), else what the `Reference`
    (r2q.reference) runs live: the frozen model, the policy with its adapters off, or nothing."""
    from ..reference import AdaptersOff, CachedReference, Reference

    if not isinstance(ref, Reference):
        return ref
    if isinstance(ref, AdaptersOff):
        return ref.as_module()
    if isinstance(ref, CachedReference):
        raise UserError("a cached reference holds the log-probs of a data set's completions only; search scores new "
                        "tokens and needs the reference model itself")
    return ref.model


def check_prompt_ids(prompts, vocab: int | None) -> None:
    """Token-id prompts: a non-empty list of non-empty id lists, every id inside the model's vocabulary (an id
    beyond it would index past the embedding table)."""
    prompts = listed(prompts, "prompts")
    for i, p in enumerate(prompts, start=1):
        if isinstance(p, (int, str, bytes)) or not hasattr(p, "__len__"):
            raise UserError(f"prompt {i} must be a list of token ids; got {type(p).__name__} (prompts is a list of "
                            "them)")
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty: decoding starts from at least one token (BOS)")
        ids = torch.as_tensor(p)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise UserError(f"prompt {i} must hold integer token ids; got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise UserError(f"prompt {i} holds a negative token id ({lo})")
        if vocab is not None and hi >= vocab:
            raise UserError(f"prompt {i} holds token id {hi}, outside the model's vocabulary (0..{vocab - 1})")


def check_room(prompts: Sequence[Sequence[int]], cfg: GenerateConfig, *models) -> None:
    """Every prompt with its --max-new-tokens within the positions the models embed where they look them up in a
    learned table (r2q.models.position_limit): one line naming the longest prompt, before any compute, instead of an
    IndexError when decoding gets there."""
    limit = position_limit(*models)
    if limit is None:
        return
    new = cfg.max_new_tokens
    over = [(len(p), i) for i, p in enumerate(prompts, start=1) if len(p) + new > limit]
    if over:
        n, i = max(over)
        fix = f"lower --max-new-tokens to {limit - n}" if n < limit else f"shorten it below {limit} tokens"
        many = f" ({len(over)} prompts are too long)" if len(over) > 1 else ""
        raise UserError(f"prompt {i} is {n} tokens, and with --max-new-tokens {new} its sequences could be {n + new} "
                        f"tokens, past the {limit} positions the model embeds (a learned position table){many}: {fix}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@torch.no_grad()
def generate_ids(policy, prompts: Sequence[Sequence[int]], cfg: GenerateConfig, eos_ids: Sequence[int], pad_id: int,
                 ref=None, base=None, tokenizer=None, scorer=None,
                 generator: torch.Generator | None = None, compute: Compute | None = None
                 ) -> tuple[list[Hypothesis], Compute]:
    """One batch: the best hypothesis per prompt (with the log-probs the search computed on the way, None where
    it did not run that model) and the compute the search spent (counted into `compute` when given). `ref`: a
    model or a `Reference`."""
    ref = reference_model(ref)
    check_models(cfg, ref, base)  # (generate checked already; this is for callers of generate_ids itself)
    if isinstance(eos_ids, (int, str)) or not eos_ids or not all(_is_int(e) for e in eos_ids):
        raise UserTypeError(f"eos_ids must be a list of token ids (ints), e.g. [tokenizer.eos_token_id]; got "
                            f"{eos_ids!r}")
    if not _is_int(pad_id):
        raise UserTypeError(f"pad_id must be a token id (an int); got {type(pad_id).__name__} {pad_id!r}")
    check_prompt_ids(prompts, vocab_size(policy) if has_head(policy) else None)
    check_room(prompts, cfg, policy, ref, base)
    job = Job(policy, cfg, eos_ids, pad_id, ref, base, tokenizer, scorer, generator, compute or Compute())
    return REGISTRY[cfg.method].run(job, prompts), job.compute.stop()


@torch.no_grad()
def sequence_logps(model, prompts, completions, pad_id: int, compute: Compute | None = None) -> list[float]:
    """log p(y|x) of finished outputs under one model, with the training code path (0 for an empty output);
    the forward is counted in `compute` when given."""
    keep = [i for i, c in enumerate(completions) if len(c)]
    out = [0.0] * len(completions)
    if keep:
        b = build_batch([prompts[i] for i in keep], [completions[i] for i in keep], pad_id)
        b = b.to(next(model.parameters()).device)
        s = sequence_rewards(completion_logps(model, b), b.completion_mask()).tolist()
        for j, i in enumerate(keep):
            out[i] = s[j]
        if compute is not None:
            compute.forward_passes += 1
            compute.tokens_processed += sum(len(prompts[i]) + len(completions[i]) for i in keep)
    return out


@torch.no_grad()
def score_sequences(policy, ref, prompts, completions, pad_id: int, beta: float):
    """log pi(y|x) and beta * log pi/pi_ref (None without a reference) of finished outputs, rescored."""
    logp = sequence_logps(policy, prompts, completions, pad_id)
    if ref is None:
        return logp, [None] * len(completions)
    ref_lp = sequence_logps(ref, prompts, completions, pad_id)
    return logp, [token_rewards(a, b, beta) for a, b in zip(logp, ref_lp)]


def _complete(hyps: list[Hypothesis], prompts, policy, ref, pad: int, compute: Compute) -> None:
    """Give every hypothesis log pi(y|x) and, with a reference, log pi_ref(y|x): kept from the search where it ran
    that model, else one rescoring forward over the batch's outputs, added to the compute."""
    toks = [h.token_ids for h in hyps]
    if any(h.logp is None for h in hyps):
        for h, lp in zip(hyps, sequence_logps(policy, prompts, toks, pad, compute)):
            h.logp = lp
    if ref is not None and any(h.ref_logp is None for h in hyps):
        for h, lp in zip(hyps, sequence_logps(ref, prompts, toks, pad, compute)):
            h.ref_logp = lp


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    """Prompt token ids as decoding starts from them, encoded as training encodes a prompt (`encode_prompt`): a
    list of chat messages is rendered with the chat template and its generation prompt; an empty prompt is BOS
    alone. A bad prompt stops with one line naming it."""
    out = []
    for i, p in enumerate(prompts, start=1):
        try:
            out.append(encode_prompt(tokenizer, p))
        except UserError as e:
            raise UserError(f"prompt {i}: {e}") from None
    return out


SAMPLED = ("sample", "best-of-n", "chunk-beam")  # methods whose random stream runs through the batches in order


def generate(policy, tokenizer, prompts: Sequence[str | list[dict]], cfg: GenerateConfig, ref=None, base=None,
             progress: bool = False, procs: Processes | None = None) -> tuple[list[Hypothesis], dict[str, float]]:
    """Decode every prompt (a string, or a list of chat messages) with cfg.method; returns one Hypothesis per
    prompt and the total compute. procs: the processes decoding together (`r2q.shards.processes()` under torchrun
    or accelerate launch; every one must call): each decodes every N-th batch and every process returns all of
    them, in input order, the one-process result. Default: this process alone. `ref`: a model or a `Reference`
    (r2q.reference): a LoRA policy searches against its own base with `AdaptersOff(lambda: policy)`."""
    prompts = listed(prompts, "prompts")
    check_loaded(policy)
    ref = reference_model(ref)
    for m, what in ((ref, "ref"), (base, "base")):
        if m is not None:
            check_loaded(m, what)
    check_models(cfg, ref, base)
    check_vocab(tokenizer, policy, ref)
    check_vocab(tokenizer, policy, base, "base")
    procs = procs or Processes()
    if procs.world > 1 and (cfg.method in SAMPLED or (cfg.method == "guided" and cfg.do_sample)):
        raise UserError(f"--method {cfg.method} samples, and its random stream runs through the batches in order, "
                        "so it cannot be split across processes with the same result: run it in one process")
    for m in (policy, ref, base):
        if m is not None:
            m.eval()
    scorer = load_external_scorer(cfg.scorer) if cfg.method == "best-of-n" and cfg.ranking == "external" else None
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; a search needs one to end its hypotheses")
    eos_ids = [tokenizer.eos_token_id]
    pad = pad_id(tokenizer)
    enc = encode_prompts(tokenizer, prompts)
    check_room(enc, cfg, policy, ref, base)
    if cfg.budget:
        cfg = with_budget(cfg, sum(map(len, enc)) / len(enc), ref is not None)
    check_memory(cfg, [m for m in (policy, ref, base) if m is not None], max(map(len, enc)), len(enc))
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    starts = range(0, len(prompts), cfg.batch_size)
    done: dict[int, tuple[list[Hypothesis], dict[str, float]]] = {}
    with progress_bar(progress and procs.is_main) as bar:
        task = bar.add_task(cfg.method, total=len(prompts), info="")
        for k in procs.mine(len(starts)):
            i = starts[k]
            chunk = enc[i : i + cfg.batch_size]
            hyps, compute = generate_ids(policy, chunk, cfg, eos_ids, pad, ref, base, tokenizer, scorer, g)
            _complete(hyps, chunk, policy, ref, pad, compute)
            share = {key: v / len(chunk) for key, v in compute.as_dict().items()}
            for j, h in enumerate(hyps):
                h.prompt, h.compute = prompts[i + j], share
                h.text = tokenizer.decode(h.token_ids, skip_special_tokens=True)
                h.reward = token_rewards(h.logp, h.ref_logp, cfg.beta) if ref is not None else None
            done[k] = hyps, compute.as_dict()
            bar.update(task, advance=len(chunk) * procs.world)
    done = procs.merge(done)
    results = [h for k in range(len(starts)) for h in done[k][0]]
    total: dict[str, float] = {"forward_passes": 0, "tokens_processed": 0, "wall_time_s": 0.0}
    for k in range(len(starts)):
        for key, v in done[k][1].items():
            total[key] += v
    if cfg.budget:
        total["width"] = cfg.width
    return results, total

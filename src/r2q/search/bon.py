"""Best-of-N: N samples per prompt, reranked by likelihood, implicit reward, or an external scorer."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
from ..rewards import aggregate_steps, step_ends_from_text, step_rewards, token_rewards
from ..tokens import token_pieces
from .config import RANKINGS  # noqa: F401  (re-exported where it was)


def sample_scores(tokens: list[list[int]], pol: list[torch.Tensor], ref: list[torch.Tensor] | None, beta: float,
                  ranking: str, tokenizer=None, delimiter: str = "\n",
                  contexts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Score each sample (S,) from its recorded per-token log-probs.

    likelihood: sum_t log pi;  reward: sum_t beta log pi/pi_ref;  reward-min / reward-last: the implicit-PRM
    step rewards (token rewards summed within steps split at `delimiter`), their minimum or the last one.
    """
    if ranking == "likelihood":
        return torch.stack([p.sum() for p in pol])
    if ref is None:
        raise UserError(f"ranking by {ranking} needs a reference model (--ref)")
    L = max((len(t) for t in tokens), default=0)
    r = torch.zeros(len(tokens), L)
    mask = torch.zeros(len(tokens), L, dtype=torch.bool)
    for i, (p, q) in enumerate(zip(pol, ref)):
        r[i, : len(p)] = token_rewards(p, q, beta)
        mask[i, : len(p)] = True
    if ranking == "reward":
        return r.sum(-1)
    # steps are cut as `r2q credit` cuts them: the text each token adds after its prompt (contexts)
    pieces = [token_pieces(tokenizer, t, contexts[i] if contexts else ()) for i, t in enumerate(tokens)]
    ends = step_ends_from_text(pieces, delimiter)
    if ends.shape[1] < L:
        ends = torch.nn.functional.pad(ends, (0, L - ends.shape[1]))
    sums, smask = step_rewards(r, ends, mask)
    return aggregate_steps(sums, smask, "min" if ranking == "reward-min" else "last")


def load_external_scorer(spec: str, device="cpu") -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """`module:function` (called as f(prompts, completions) -> scores) or a directory holding an HF
    sequence-classification reward model (score = its single logit, or log p(last label) for several)."""
    if ":" in spec and not spec.startswith(("/", ".")):
        mod, _, fn = spec.partition(":")
        sys.path.insert(0, os.getcwd())  # a module beside the user, as `python -m` would find it
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, SyntaxError) as e:
            raise UserError(f"cannot load scorer {spec!r}: {e}") from e
        finally:
            sys.path.remove(os.getcwd())
        if not callable(f):
            raise UserError(f"scorer {spec!r} is not a function")
        try:
            inspect.signature(f).bind([], [])
        except TypeError:
            raise UserError(f"scorer {spec!r} must take (prompts, completions); it is {fn}{inspect.signature(f)}"
                            ) from None
        except ValueError:  # no signature to read (some built-ins): it is called as it is
            pass
        return f
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..models import check_config_kernel

    check_config_kernel(Path(spec))
    try:
        # never the directory's own code: transformers would otherwise ask on stdin, and a "y" there would run it
        model = AutoModelForSequenceClassification.from_pretrained(spec, use_safetensors=True,
                                                                   trust_remote_code=False).eval().to(device)
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a reward model from {spec}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id

    @torch.no_grad()
    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        enc = tok([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True).to(device)
        logits = model(**enc).logits.float()
        s = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
        return s.tolist()

    return score


def checked_scores(scores, n: int, spec: str) -> torch.Tensor:
    """An external scorer's output as (n,) floats, or a one-line error saying what it returned instead."""
    try:
        t = torch.as_tensor([float(x) for x in scores], dtype=torch.float)
    except (TypeError, ValueError) as e:
        raise UserError(f"scorer {spec!r} must return a list of {n} numbers ({e})") from None
    if len(t) != n:
        raise UserError(f"scorer {spec!r} returned {len(t)} scores for {n} completions")
    if not all(math.isfinite(x) for x in t.tolist()):
        raise UserError(f"scorer {spec!r} returned a score that is NaN or infinite")
    return t

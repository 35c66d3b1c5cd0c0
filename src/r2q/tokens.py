"""Token batches and per-token log-probs.

Every scored token is one entry of a flat list: the hidden state that predicts it (``src_index``, a flat index
into the ``(R, T)`` grid of the model's rows), the token itself (``targets``), and where it goes in the
completion-aligned output (``seq_index``, ``tok_index``). This one layout serves the plain layout (one row per
prompt + completion) and the prefix-shared one (prompt + chosen + rejected in one row, where the last prompt
token predicts the first token of both completions), and it lets the LM head run on scored positions only.

Outputs are completion-aligned ``(S, L)`` tensors: entry ``[s, t]`` is about the t-th completion token of
sequence s (EOS included); ``mask[s, t]`` says whether it exists. A prompt token is never scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Configs with any of these attributes post-process logits in ways the head-only path would skip;
# such models fall back to a full forward (correct, just slower).
_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_scale_init_value",
                         "lm_head_multiplier", "output_multiplier")


@dataclass
class TokenBatch:
    """A batch of completions to score, in model rows plus a flat list of scored tokens.

    input_ids, position_ids: (R, T) long.  attention_mask: (R, T) long (plain rows: 1 for a real token), or for
    prefix-shared (and packed) rows (R, 2, T) long: each token's block (the pair it belongs to; -1 padding) and
    segment (0 prompt, 1 chosen, 2 rejected). The (T, T) mask is made from these by the forward, in the form the
    attention implementation takes (`shared_mask`), so a batch never stores it.
    src_index, targets, seq_index, tok_index: (N,) long, one entry per scored token.
    lengths: (S,) long, the number of tokens of each completion.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    src_index: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    tok_index: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return int(self.lengths.numel())

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def completion_mask(self) -> torch.Tensor:
        """(S, L) bool: which completion-aligned entries are real tokens."""
        ar = torch.arange(self.max_len, device=self.lengths.device)
        return ar[None, :] < self.lengths[:, None]

    def completion_ids(self) -> torch.Tensor:
        """(S, L) long: the completion tokens, 0 where masked."""
        return self.scatter(self.targets).long()

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """Place (N,) per-token values into a completion-aligned (S, L) tensor (0 where masked)."""
        out = flat.new_zeros(self.num_seqs, self.max_len)
        out[self.seq_index, self.tok_index] = flat
        return out

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def num_tokens(self) -> int:
        """Tokens the model processes (non-padding positions of all rows)."""
        if self.attention_mask.dim() == 2:
            return int(self.attention_mask.sum())
        return int((self.attention_mask[:, 1] >= 0).sum())


def build_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """One right-padded row per (prompt, completion); completion s is scored from row s."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in number")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(R, T, dtype=torch.long)
    src, tgt, seq, tok = [], [], [], []
    for s, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0:
            raise ValueError("a prompt must have at least one token (e.g. BOS) to predict the first completion token")
        row = rows[s]
        input_ids[s, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[s, : len(row)] = 1
        P = len(p)
        for t in range(len(c)):
            src.append(s * T + P + t - 1)
            tgt.append(c[t])
            seq.append(s)
            tok.append(t)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids, attention_mask, position_ids, *_long(src, tgt, seq, tok),
        torch.tensor([len(c) for c in completions], dtype=torch.long),
    )


def build_pair_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
    share_prefix: bool = False,
    pack_to: int = 0,
) -> TokenBatch:
    """Score B preference pairs: completions 0..B-1 are the chosen ones, B..2B-1 the rejected ones.

    share_prefix=False: 2B plain rows (prompt + chosen, then prompt + rejected).
    share_prefix=True: each pair is one block [prompt, chosen, rejected]; the rejected tokens attend to the prompt
    and to themselves but not to the chosen ones, and their positions restart right after the prompt, so every
    scored token sees exactly the context it has in the plain layout while the prompt is run once.
    pack_to > 0 (with share_prefix): blocks are packed into rows of up to max(pack_to, the longest block) tokens,
    first fit by decreasing length; a token attends within its own block only, and positions restart per block,
    so pairs of very different lengths need little padding.
    """
    B = len(prompts)
    if not (len(chosen) == len(rejected) == B):
        raise ValueError("prompts, chosen and rejected differ in number")
    if not share_prefix:
        return build_batch(list(prompts) * 2, list(chosen) + list(rejected), pad_id)
    sizes = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    rows = _pack(sizes, pack_to) if pack_to else [[b] for b in range(B)]
    T = max(sum(sizes[b] for b in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    block = torch.full((R, T), -1, dtype=torch.long)  # which pair of the row a token belongs to; -1 padding
    segment = torch.full((R, T), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    src, tgt, seq, tok = [], [], [], []
    for row, members in enumerate(rows):
        o = 0  # where the block starts in its row
        for b in members:
            p, c, r = prompts[b], chosen[b], rejected[b]
            if len(p) == 0:
                raise ValueError("a prompt must have at least one token (e.g. BOS) to predict the first completion "
                                 "token")
            P, C, Rn = len(p), len(c), len(r)
            input_ids[row, o : o + P + C + Rn] = torch.tensor(list(p) + list(c) + list(r), dtype=torch.long)
            position_ids[row, o : o + P + C] = torch.arange(P + C)
            position_ids[row, o + P + C : o + P + C + Rn] = torch.arange(P, P + Rn)
            block[row, o : o + P + C + Rn] = b
            segment[row, o : o + P], segment[row, o + P : o + P + C], segment[row, o + P + C : o + P + C + Rn] = 0, 1, 2
            for s, (start, comp) in ((b, (P, c)), (B + b, (P + C, r))):
                for t in range(len(comp)):
                    # the first token of either completion is predicted by the last prompt token
                    src.append(row * T + o + (P - 1 if t == 0 else start + t - 1))
                    tgt.append(comp[t])
                    seq.append(s)
                    tok.append(t)
            o += P + C + Rn
    return TokenBatch(
        input_ids, torch.stack([block, segment], 1), position_ids, *_long(src, tgt, seq, tok),
        torch.tensor([len(c) for c in chosen] + [len(r) for r in rejected], dtype=torch.long),
    )


def _pack(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Blocks (by index) into rows of at most max(capacity, largest block) tokens: first fit, longest first."""
    cap = max(capacity, max(sizes))
    rows: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for r, left in enumerate(room):
            if sizes[b] <= left:
                rows[r].append(b)
                room[r] -= sizes[b]
                break
        else:
            rows.append([b])
            room.append(cap - sizes[b])
    return rows


def pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Completion-aligned (S, length) float tensor from per-completion 1-D values, zero-padded."""
    out = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _long(*lists: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(x, dtype=torch.long) for x in lists]


def gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] = logits[target] - logsumexp(logits), in fp32.  (N, V), (N,) -> (N,)"""
    logits = logits.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_only(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (
        model.get_output_embeddings() is not None
        and getattr(model, "base_model", None) is not None
        and model.base_model is not model
        and not any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING)
    )


def _wrapped(model: torch.nn.Module) -> bool:
    """DDP, FSDP1 (a wrapper) or FSDP2 (a swapped class): their hooks (gradient all-reduce, unsharding) run only
    through the model's own forward, so calling base_model and the head directly would bypass them."""
    if hasattr(model, "module"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def attn_impl(model) -> str:
    """The attention implementation the model's config names ("" when it names none)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or ""


def _takes_4d_mask(impl: str) -> bool:
    """Whether an attention implementation takes the 4D (per-row, per-query) mask prefix-shared rows need:
    flash-attention kernels take only padding masks."""
    return "flash" not in impl


def eager_flex(model) -> bool:
    """Whether the model runs FlexAttention on the CPU, where r2q runs it uncompiled: transformers compiles
    flex_attention on its first call, and on the CPU (torch 2.13) the compiled kernel gave log-probs 0.36 off eager
    attention's on a tiny Llama (plain and shared layouts) and failed to build in a beam search (C++ compile
    error), while uncompiled FlexAttention gives eager attention's values (tests/test_model_families.py)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    model = getattr(model, "module", model)
    if "flex" not in attn_impl(model):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu"


def attention_stance(model=None, *, on: bool | None = None):
    """A fresh context for a forward of `model` (or, with `on`, of a model already asked `eager_flex`):
    torch.compile's stance forced to eager where `eager_flex(model)`, and the two warnings that uncompiled
    FlexAttention then gives (unfused kernel; create_block_mask's _compile flag, which transformers passes)
    silenced, since running it so is r2q's choice; nothing for any other model."""
    if not (eager_flex(model) if on is None else on):
        return contextlib.nullcontext()
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=r"flex_attention called without torch\.compile")
    warnings.filterwarnings("ignore", message=r"_compile flag on create_block_mask")
    stack.enter_context(torch.compiler.set_stance("force_eager"))
    return stack


def can_share_prefix(*models) -> bool:
    """Whether every model's attention takes the mask prefix-shared rows need."""
    return all(_takes_4d_mask(attn_impl(m)) for m in models if m is not None)


def shared_layout(share_prefix: bool, *models, say=None) -> bool:
    """share_prefix if the models can take it; else False, said once through `say` (one line)."""
    if share_prefix and not can_share_prefix(*models):
        if say is not None:
            impls = {attn_impl(m) for m in models if m is not None}
            say(f"prefix sharing needs a 4D attention mask, which {', '.join(sorted(impls))} cannot take: "
                "pairs run in the plain layout (one row per completion)")
        return False
    return share_prefix


def dense_shared_mask(ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool from a shared batch's (R, 2, T) block and segment ids: query q may attend to key k when
    k <= q, both are in the same block, and k is in the prompt or in q's own completion. Padding queries attend to
    the first token only, so no row is empty (no NaN in softmax).

    Built in place on one (R, T, T) tensor: with code = 3 * block + segment, a real key k is visible to q exactly
    when code[k] is q's own code or the code of q's block's prompt (3 * block[q])."""
    block, segment = ids[:, 0], ids[:, 1]
    T = ids.shape[-1]
    code = 3 * block + segment  # padding: block -1, segment -1 -> -4, never a real query's code or prompt code
    m = code[:, None, :] == code[:, :, None]
    m |= code[:, None, :] == (3 * block)[:, :, None]
    m &= torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    pad = segment < 0
    m.masked_fill_(pad[:, :, None], False)
    m[:, :, 0] |= pad
    return m[:, None]


def shared_mask(ids: torch.Tensor, impl: str, dtype: torch.dtype):
    """The mask of prefix-shared rows ((R, 2, T) block and segment ids) in the form the attention implementation
    takes: a BlockMask for flex_attention, computed block by block from the ids (no (T, T) tensor, and its kernels
    skip the blocks with nothing to attend); booleans for sdpa (True = attend); additive (0 or the dtype's minimum)
    for eager attention, which adds the mask to its scores."""
    if not _takes_4d_mask(impl):
        raise ValueError(f"prefix-shared rows need a 4D attention mask, which {impl} cannot take; "
                         "use share_prefix=False (--no-share-prefix)")
    if "flex" in impl:
        from torch.nn.attention.flex_attention import create_block_mask

        block, segment = ids[:, 0], ids[:, 1]

        def mask_mod(b, h, q, k):
            sq, sk = segment[b, q], segment[b, k]
            real = (k <= q) & (block[b, q] == block[b, k]) & (sk >= 0) & (sq >= 0) & ((sk == 0) | (sk == sq))
            return real | ((k == 0) & (sq < 0))

        R, _, T = ids.shape
        return create_block_mask(mask_mod, B=R, H=None, Q_LEN=T, KV_LEN=T, device=ids.device)
    allowed = dense_shared_mask(ids)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def flat_token_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, src_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | s_t) for every scored token of a batch (a TokenBatch's fields): (N,) float32.

    Runs the transformer body once over the rows, then the LM head and the log-softmax only on the
    N positions (src_index into the flattened rows) that predict a completion token (targets).
    """
    if hasattr(model, "get_base_model"):  # PEFT: its adapters live inside the HF model it wraps
        model = model.get_base_model()
    hf = getattr(model, "module", model)  # DDP and FSDP1 keep the HF model at .module
    mask = attention_mask
    if mask.dim() == 3:  # prefix-shared rows: block and segment ids
        mask = shared_mask(mask, attn_impl(hf), next(model.parameters()).dtype)
    kw = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
    if not _wrapped(model) and _head_only(model):
        with attention_stance(hf):
            hidden = model.base_model(**kw, use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[src_index]
        logits = model.get_output_embeddings()(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    else:
        with attention_stance(hf):
            logits = model(**kw, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[src_index]
    return gather_logps(logits, targets)


class TokenScorer(torch.nn.Module):
    """A causal LM whose forward is `flat_token_logps`. Wrapping this (not the LM) in DDP or FSDP keeps the
    head-only scoring inside the wrapper's forward, where its gradient hooks run."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, src_index, targets) -> torch.Tensor:
        return flat_token_logps(self.model, input_ids, attention_mask, position_ids, src_index, targets)


def completion_logps(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Per-token log pi(a_t|s_t) of each completion, completion-aligned: (S, L) float32, 0 where masked."""
    b = batch
    return b.scatter(flat_token_logps(model, b.input_ids, b.attention_mask, b.position_ids, b.src_index, b.targets))


def examples_batch(examples, pad_id: int, share_prefix: bool = True, pack_to: int = 0) -> TokenBatch:
    """The batch of tokenised examples (r2q.data's PreferenceExample or SFTExample): pairs as
    `build_pair_batch` lays them out (chosen rows, then rejected rows), completions as `build_batch`."""
    prompts = [e.prompt_ids for e in examples]
    if examples and hasattr(examples[0], "chosen_ids"):
        return build_pair_batch(prompts, [e.chosen_ids for e in examples], [e.rejected_ids for e in examples],
                                pad_id, share_prefix, pack_to)
    return build_batch(prompts, [e.completion_ids for e in examples], pad_id)


# ---------------------------------------------------------------------------------------------- text


def decode_exact(tokenizer, ids: Sequence[int]) -> str:
    """The text of ids with nothing dropped or cleaned up (special tokens and spaces kept)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_pieces(tokenizer, ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
    """The text each token adds, decoded in a sliding window after a few `context` (prompt) tokens, so
    leading spaces survive and ''.join(pieces) is the decoded text. A token that ends inside a multi-byte
    character adds "" and the character comes with the token that completes it."""
    window = list(context)[-4:]
    prev = decode_exact(tokenizer, window)
    pieces: list[str] = []
    for t, tok in enumerate(ids):
        window.append(tok)
        text = decode_exact(tokenizer, window)
        if text.endswith("\ufffd") and t + 1 < len(ids) and not prev.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(prev):] if text.startswith(prev) else decode_exact(tokenizer, [tok]))
        if len(window) > 12:
            window = window[-4:]
            text = decode_exact(tokenizer, window)
        prev = text
    return pieces

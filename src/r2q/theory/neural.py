"""The tree MDP with a tiny transformer as reference and policy, scored through r2q's token code paths.

The model is an HF causal LM from `r2q.toy.tiny_model` over the tree's own vocabulary (id 0 is EOS and BOS,
1..K the content tokens), so the model puts no probability outside the tree except at forced states, where the
horizon makes EOS certain: there log pi(EOS|s) is set to 0 (log 1) for every policy, exactly what masking the
other logits would do. Prompt p is the ids ``[0, 1 + p]`` (p < K).

Two views of one model must agree: per-state log-prob tables (S, V) read from the last position of each state's
prefix, and per-token log-probs of every completion from `build_batch` + `completion_logps` (the trainer's path).
`state_table` gives the first, `Scorer.token_logps` the second; the DPO loss is built on the second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..rewards import implicit_rewards, sequence_rewards
from ..tokens import build_batch, completion_logps
from ..toy import tiny_model
from .dpo import Pairs, pair_loss
from .mdp import DTYPE, EOS, TokenTree


def prompt_ids(tree: TokenTree, p: int) -> list[int]:
    """Token ids of prompt p: BOS (= EOS id 0) then content token 1 + p."""
    if p >= tree.n_tokens:
        raise ValueError("the transformer variant needs n_prompts <= n_tokens")
    return [EOS, 1 + p]


def forced_positions(tree: TokenTree) -> torch.Tensor:
    """(S, H) bool: the EOS at depth H - 1 of each completion that reaches the horizon."""
    forced = torch.zeros_like(tree.seq_mask)
    forced[:, tree.horizon - 1] = tree.seq_mask[:, tree.horizon - 1]
    return forced


@dataclass
class Scorer:
    """All completions of the tree as one `TokenBatch` (one row per completion), scored by a model."""

    tree: TokenTree
    batch: object
    forced: torch.Tensor

    @classmethod
    def for_tree(cls, tree: TokenTree) -> Scorer:
        prompts = [prompt_ids(tree, int(tree.prompt[j])) for j in range(tree.num_states)]
        completions = [list(tree.tokens(j)) for j in range(tree.num_states)]
        return cls(tree, build_batch(prompts, completions, pad_id=EOS), forced_positions(tree))

    def token_logps(self, model: torch.nn.Module) -> torch.Tensor:
        """log pi(a_t|s_t) of every completion, completion-aligned (S, H) float64, 0 at masked and forced entries."""
        lp = completion_logps(model, self.batch).to(DTYPE)
        return lp.masked_fill(self.forced | ~self.tree.seq_mask, 0.0)


@torch.no_grad()
def state_table(tree: TokenTree, model: torch.nn.Module) -> torch.Tensor:
    """(S, V) float64 log pi(a|s) read from the model's next-token distribution at each state; forced states
    get log pi(EOS) = 0 and -inf elsewhere (the horizon)."""
    rows = [prompt_ids(tree, int(tree.prompt[s])) + list(tree.tokens(s)[:-1]) for s in range(tree.num_states)]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [EOS] * (T - len(r)) for r in rows])
    att = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    logits = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].to(DTYPE)
    return torch.log_softmax(last.masked_fill(~tree.allowed, float("-inf")), dim=-1)


def tiny_lm(tree: TokenTree, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2):
    """A random tiny Llama over the tree's vocabulary (fp32)."""
    return tiny_model("llama", tree.vocab, seed=seed, hidden=hidden, layers=layers, heads=heads, max_positions=16)


def train_transformer(tree: TokenTree, model: torch.nn.Module, ref_tok: torch.Tensor, pairs: Pairs, beta: float,
                      steps: int = 300, lr: float = 5e-3, on_step=None) -> torch.nn.Module:
    """DPO on `pairs` with r2q's token path: completion_logps -> implicit_rewards -> sequence_rewards -> dpo_loss.

    ref_tok: (S, H) reference token log-probs (from `Scorer.token_logps` of the frozen reference).
    on_step(step, model) is called before each update and after the last one. Returns the trained model.
    """
    scorer = Scorer.for_tree(tree)
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay: a constant rate leaves Adam oscillating around the optimum of this near-deterministic loss
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    mask = tree.seq_mask
    for step in range(steps + 1):
        if on_step is not None:
            with torch.no_grad():
                on_step(step, model)
        if step == steps:
            break
        pol_tok = scorer.token_logps(model)
        R = sequence_rewards(implicit_rewards(pol_tok, ref_tok, mask, beta), mask)
        opt.zero_grad()
        pair_loss(R, pairs, beta).backward()
        opt.step()
        sched.step()
    return model.eval()

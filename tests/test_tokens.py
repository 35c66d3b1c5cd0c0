"""Per-token log-probs: the head-only, flat-index path against a plain full forward with a loop over tokens."""

import random

import pytest
import torch

from r2q.tokens import build_batch, build_pair_batch, completion_logps, gather_logps


def reference_logps(model, prompt, completion):
    """Slow and obvious: one full forward per sequence, log_softmax, read each completion token."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    P = len(prompt)
    return torch.stack([logp[P + t - 1, completion[t]] for t in range(len(completion))])


def random_pairs(vocab, n=5, seed=0):
    rng = random.Random(seed)
    seq = lambda lo, hi: [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [seq(1, 9) for _ in range(n)], [seq(1, 7) for _ in range(n)], [seq(1, 7) for _ in range(n)]


def test_gather_logps_is_log_softmax():
    logits = torch.randn(7, 11)
    t = torch.randint(0, 11, (7,))
    torch.testing.assert_close(gather_logps(logits, t), torch.log_softmax(logits, -1)[torch.arange(7), t])


def test_plain_batch_matches_reference(model):
    prompts, chosen, _ = random_pairs(model.config.vocab_size)
    batch = build_batch(prompts, chosen, pad_id=0)
    with torch.no_grad():
        lp = completion_logps(model, batch)
    mask = batch.completion_mask()
    assert lp.shape == mask.shape == (5, max(map(len, chosen)))
    assert (lp[~mask] == 0).all()
    for s in range(5):
        torch.testing.assert_close(lp[s, : len(chosen[s])], reference_logps(model, prompts[s], chosen[s]),
                                   atol=1e-5, rtol=1e-5)
    assert batch.completion_ids()[mask].tolist() == sum(chosen, [])


@pytest.mark.parametrize("share", [False, True])
def test_pair_batch_matches_reference(model, share):
    prompts, chosen, rejected = random_pairs(model.config.vocab_size, n=6, seed=1)
    batch = build_pair_batch(prompts, chosen, rejected, pad_id=0, share_prefix=share)
    assert batch.input_ids.shape[0] == (6 if share else 12)
    with torch.no_grad():
        lp = completion_logps(model, batch)
    for b in range(6):
        torch.testing.assert_close(lp[b, : len(chosen[b])], reference_logps(model, prompts[b], chosen[b]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp[6 + b, : len(rejected[b])], reference_logps(model, prompts[b], rejected[b]),
                                   atol=1e-5, rtol=1e-5)


def test_prefix_sharing_processes_fewer_tokens():
    prompts, chosen, rejected = [[1] * 20], [[2] * 5], [[3] * 5]
    plain = build_pair_batch(prompts, chosen, rejected, pad_id=0)
    shared = build_pair_batch(prompts, chosen, rejected, pad_id=0, share_prefix=True)
    assert plain.num_tokens == 50 and shared.num_tokens == 30
    # with padding (pairs of different lengths), only real tokens count
    shared = build_pair_batch([[1] * 20, [1] * 3], [[2] * 5, [2]], [[3] * 5, [3] * 2], pad_id=0, share_prefix=True)
    assert shared.num_tokens == 30 + 6


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt"):
        build_batch([[]], [[1, 2]], pad_id=0)


def test_shared_rows_carry_ids_not_a_dense_mask_and_the_mask_is_the_rule():
    """A shared (and packed) batch stores each token's block and segment, (R, 2, T), not a (T, T) mask; the mask made
    from them equals the rule written out token pair by token pair: same block, key not after the query, key in the
    prompt or in the query's own completion (padding queries see the first token only)."""
    from r2q.tokens import dense_shared_mask

    rng = random.Random(3)
    P = [[rng.randrange(2, 50) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    C = [[rng.randrange(2, 50) for _ in range(rng.randint(1, 4))] for _ in range(5)]
    R = [[rng.randrange(2, 50) for _ in range(rng.randint(1, 4))] for _ in range(5)]
    for pack in (0, 12):
        b = build_pair_batch(P, C, R, 0, share_prefix=True, pack_to=pack)
        rows, T = b.input_ids.shape
        assert b.attention_mask.shape == (rows, 2, T)
        block, seg = b.attention_mask[:, 0].tolist(), b.attention_mask[:, 1].tolist()
        dense = dense_shared_mask(b.attention_mask)[:, 0]
        for r in range(rows):
            for q in range(T):
                for k in range(T):
                    if seg[r][q] < 0:
                        want = k == 0
                    else:
                        want = (k <= q and block[r][k] == block[r][q] and seg[r][k] >= 0
                                and seg[r][k] in (0, seg[r][q]))
                    assert bool(dense[r, q, k]) == want, (pack, r, q, k)
        assert b.num_tokens == sum(len(p) + len(c) + len(x) for p, c, x in zip(P, C, R))

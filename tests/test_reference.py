"""The reference source: each kind gives the per-token log-probs of an explicit frozen copy of the reference (or
none), on the batch layouts the trainer and credit use; and the -beta KL identity it feeds."""

import copy
import random

import pytest
import torch
from conftest import WORDS

from r2q.data import PreferenceExample
from r2q.models import load_model
from r2q.reference import (
    AdaptersOff,
    CachedReference,
    LiveReference,
    NoReference,
    batch_slots,
    precomputed,
    score_reference,
)
from r2q.rewards import expected_reward, kl_ref_pi
from r2q.tokens import completion_logps, examples_batch


def examples(tokenizer, n=7, seed=0):
    rng = random.Random(seed)
    enc = tokenizer.encode
    out = []
    for i in range(n):
        prompt = enc(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))))
        out.append(PreferenceExample(prompt, enc(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))),
                                     enc(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))), i))
    return out


@pytest.fixture(scope="module")
def frozen(llama_ref_dir):
    return load_model(llama_ref_dir).eval()


@pytest.mark.parametrize("share_prefix", [True, False])
def test_live_reference_is_the_frozen_model(frozen, tokenizer, share_prefix):
    ex = examples(tokenizer)
    b = examples_batch(ex[2:6], 0, share_prefix)
    got = LiveReference(copy.deepcopy(frozen)).logps(b, batch_slots(range(2, 6), True))
    torch.testing.assert_close(got, completion_logps(frozen, b), rtol=0, atol=0)


def test_adapters_off_is_the_base_the_adapters_train_on(frozen, tokenizer):
    from r2q.prepare import with_lora

    policy = with_lora(copy.deepcopy(frozen), 4, 16.0, 0.0, "all-linear")
    with torch.no_grad():  # adapters that change the policy (PEFT starts them at zero)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    b = examples_batch(examples(tokenizer), 0, True)
    off = AdaptersOff(lambda: policy).logps(b, batch_slots(range(7), True))
    torch.testing.assert_close(off, completion_logps(frozen, b), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (completion_logps(policy, b) - off).abs().max() > 1e-3  # the adapters are on again afterwards


def test_cached_reference_gives_the_frozen_models_numbers_in_any_batch_order(frozen, tokenizer, tmp_path):
    ex = examples(tokenizer, n=9)
    cached, hit = precomputed(frozen, tokenizer, ex, 0, tmp_path, share_prefix=True, batch_size=4)
    assert not hit and cached.kind == "cache" and cached.model is None
    again, hit = precomputed(frozen, tokenizer, ex, 0, tmp_path, share_prefix=True, batch_size=4)
    assert hit and len(again.rows) == 18
    idx = [7, 1, 4]  # a length-sorted micro-batch picks examples out of order
    b = examples_batch([ex[i] for i in idx], 0, True)
    got = cached.logps(b, batch_slots(idx, True))
    want = completion_logps(frozen, b)
    mask = b.completion_mask()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all()


def test_scored_rows_follow_the_cache_order(frozen, tokenizer):
    ex = examples(tokenizer, n=3)
    rows = score_reference(frozen, ex, 0, True, 2)
    for i, e in enumerate(ex):
        for k, comp in enumerate((e.chosen_ids, e.rejected_ids)):
            b = examples_batch([e], 0, False)
            assert len(rows[2 * i + k]) == len(comp)
            torch.testing.assert_close(rows[2 * i + k], completion_logps(frozen, b)[k, : len(comp)], rtol=1e-5,
                                       atol=1e-6)


def test_no_reference_gives_none_and_is_false(tokenizer):
    b = examples_batch(examples(tokenizer, n=2), 0, True)
    ref = NoReference()
    assert ref.logps(b, [0, 1, 2, 3]) is None and not ref and ref.model is None
    assert LiveReference(torch.nn.Linear(1, 1)) and CachedReference([])


def test_slots_pair_chosen_rows_then_rejected_rows():
    assert batch_slots([3, 0], True) == [6, 0, 7, 1]
    assert batch_slots([3, 0], False) == [3, 0]


def test_expected_reward_under_the_reference_is_minus_beta_kl():
    """E_{y~pi_ref}[beta log pi(y)/pi_ref(y)] = -beta KL(pi_ref || pi), exactly over all completions and in the mean
    over samples of pi_ref."""
    g = torch.Generator().manual_seed(0)
    beta = 0.3
    log_pi = torch.log_softmax(torch.randn(4, 12, generator=g, dtype=torch.float64), -1)
    log_ref = torch.log_softmax(torch.randn(4, 12, generator=g, dtype=torch.float64), -1)
    R = beta * (log_pi - log_ref)
    kl = (log_ref.exp() * (log_ref - log_pi)).sum(-1)  # the definition
    torch.testing.assert_close(expected_reward(R, log_ref.exp()), -beta * kl)
    torch.testing.assert_close(kl_ref_pi(R, beta, log_ref.exp()), kl)
    assert (expected_reward(R, log_ref.exp()) <= 0).all()
    draws = torch.multinomial(log_ref.exp(), 200_000, replacement=True, generator=g)  # (4, N) samples of pi_ref
    mc = expected_reward(R.gather(1, draws))
    assert (mc - (-beta * kl)).abs().max() < 0.01


def test_search_takes_a_reference_of_each_kind(frozen, tokenizer):
    """Search steps the Reference's model in lockstep with the policy: a live reference is its frozen model, a
    LoRA policy's adapters-off reference its own base (the same search as against a frozen copy of the base, with
    the adapters still on in the policy), no reference is none, and a cached one is refused (it has no model)."""
    from r2q.errors import UserError
    from r2q.prepare import with_lora
    from r2q.search import GenerateConfig, generate_ids

    policy = with_lora(copy.deepcopy(frozen), 4, 16.0, 0.0, "all-linear")
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.eval()
    prompts = [tokenizer.encode(t) for t in ("the movie was", "a film", "really not quite")]
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id or 0
    cfg = GenerateConfig(method="reward-beam", num_beams=3, max_new_tokens=6, beta=0.3)

    def run(ref):
        hyps, _ = generate_ids(policy, prompts, cfg, eos, pad, ref=ref)
        return [h.token_ids for h in hyps], [x for h in hyps for x in (h.score, h.logp, h.ref_logp)]

    want_ids, want = run(frozen)
    for ref in (LiveReference(frozen), AdaptersOff(lambda: policy)):
        ids, got = run(ref)
        assert ids == want_ids, ref.kind
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), ref.kind
    with torch.no_grad():  # the adapters are on again in the policy after the search
        x = torch.tensor([prompts[0]])
        assert (policy(input_ids=x).logits - frozen(input_ids=x).logits).abs().max() > 1e-3
    greedy = GenerateConfig(method="greedy", max_new_tokens=6)
    assert generate_ids(policy, prompts, greedy, eos, pad, ref=NoReference())[0][0].ref_logp is None
    # rescored after the search (greedy does not run the reference): the base's log-probs, not the policy's
    from r2q.search import generate

    texts = [tokenizer.decode(p) for p in prompts]
    base, _ = generate(policy, tokenizer, texts, greedy, ref=AdaptersOff(lambda: policy))
    copy_, _ = generate(policy, tokenizer, texts, greedy, ref=frozen)
    assert [h.ref_logp for h in base] == pytest.approx([h.ref_logp for h in copy_], rel=1e-5, abs=1e-5)
    assert all(abs(h.ref_logp - h.logp) > 1e-3 for h in base)
    with pytest.raises(UserError, match="needs a reference model"):
        generate_ids(policy, prompts, cfg, eos, pad, ref=NoReference())
    with pytest.raises(UserError, match="cached reference"):
        generate_ids(policy, prompts, cfg, eos, pad, ref=CachedReference([]))

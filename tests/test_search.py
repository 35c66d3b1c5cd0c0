"""Search: parity with transformers' beam search, the paper's identities, exact small-problem optima."""

import inspect
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EOS, PAD, V, enumerate_best, hf_beams, prompts_of, sharp_model
from transformers import GenerationConfig

from r2q.search import GenerateConfig, generate_ids, score_sequences
from r2q.search.beam import beam_search
from r2q.search.lm import Lockstep, left_pad
from r2q.search.sampling import draw, filter_logits, sample
from r2q.toy import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_matches_transformers_generate(arch):
    model = sharp_model(arch, seed=3)
    prompts = prompts_of(5, seed=1)
    finished_early = dropped = 0
    for K, lp, es in [(1, 0.0, False), (2, 0.0, False), (4, 0.0, False), (4, 1.0, False), (3, 1.0, True),
                      (4, -0.5, "never"), (6, 0.0, "never"), (5, 2.0, "never")]:
        with torch.no_grad():
            hf = hf_beams(model, prompts, K, lp, es, max_new=10)
        lock = Lockstep([model])
        ours = beam_search(lock, prompts, PAD, [EOS], K, 10, lambda l: l[0], length_penalty=lp,
                           early_stopping=es, num_return=K)
        for b in range(len(prompts)):
            assert [h.token_ids for h in ours[b]] == hf[b], (K, lp, es, b)
            finished_early += sum(h.num_tokens < 10 for h in ours[b])
        # every step after the prefill runs K rows per prompt still searching: fewer once a prompt is done
        steps = lock.compute.forward_passes - 1
        decoded = lock.compute.tokens_processed - sum(map(len, prompts))
        dropped += decoded < steps * K * len(prompts)
    assert finished_early > 20  # EOS paths are exercised, not only max-length ones
    if arch == "llama":  # (this GPT-2 keeps a beam of every prompt alive to the cap: nothing can leave early)
        assert dropped >= 3  # prompts that finished left the batch while others went on


def test_beam_matches_transformers_generate_with_a_vocabulary_searched_in_chunks(monkeypatch):
    """K x V large enough that the top 2K come from the chunked top-k (beam._top_k), not torch.topk over all."""
    from r2q.search import beam

    chunked, top_k = [], beam._top_k
    chunk = inspect.signature(top_k).parameters["chunk"].default

    def counted(scores, running, k):
        chunked.append(running.shape[1] * (scores.shape[1] // chunk) >= 4 * k)  # when _top_k searches by chunks
        return top_k(scores, running, k)

    monkeypatch.setattr(beam, "_top_k", counted)
    model = sharp_model("llama", seed=7, vocab=3000)
    prompts = prompts_of(6, seed=4, vocab=3000)
    for K, lp, es in [(2, 0.0, False), (4, 1.0, True), (4, 0.0, "never")]:
        with torch.no_grad():
            hf = hf_beams(model, prompts, K, lp, es, max_new=8)
        ours = beam_search(Lockstep([model]), prompts, PAD, [EOS], K, 8, lambda l: l[0], length_penalty=lp,
                           early_stopping=es, num_return=K)
        assert [[h.token_ids for h in hyps] for hyps in ours] == hf, (K, lp, es)
    assert chunked and all(chunked)


def test_beam_scores_are_sum_of_logps():
    model = sharp_model("llama", seed=4)
    prompts = prompts_of(4, seed=2)
    hyps = beam_search(Lockstep([model]), prompts, PAD, [EOS], 3, 8, lambda l: l[0], num_return=3)
    flat_p = [prompts[b] for b in range(4) for _ in hyps[b]]
    flat_t = [h.token_ids for b in range(4) for h in hyps[b]]
    logp, _ = score_sequences(model, None, flat_p, flat_t, PAD, 0.1)
    got = [h.score for b in range(4) for h in hyps[b]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(logp), atol=1e-4, rtol=1e-5)


def test_reward_beam_with_ref_term_is_likelihood_beam():
    """sum_t [beta log pi/pi_ref + beta log pi_ref] = beta log pi: the paper's Eq. 13 ranks like likelihood."""
    pol, ref = sharp_model("llama", seed=5), sharp_model("llama", seed=6, scale=3.0)
    prompts = prompts_of(6, seed=3)
    for K in (1, 3, 5):
        cfg = GenerateConfig(method="beam", num_beams=K, max_new_tokens=9)
        lik, _ = generate_ids(pol, prompts, cfg, [EOS], PAD)
        cfg = GenerateConfig(method="reward-beam", num_beams=K, max_new_tokens=9, ref_term=True, beta=0.5)
        rew, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
        assert [h.token_ids for h in lik] == [h.token_ids for h in rew]
        for a, b in zip(lik, rew):
            assert b.score == pytest.approx(0.5 * a.score, rel=1e-4)
        # without the reference term the objective differs and so, here, does the answer
    cfg = GenerateConfig(method="reward-beam", num_beams=3, max_new_tokens=9, beta=0.5)
    no_term, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
    assert [h.token_ids for h in no_term] != [h.token_ids for h in lik]


def test_reward_beam_keeps_reference_cache_in_lockstep():
    """The score reward-beam reports equals a fresh two-model rescoring of the returned tokens."""
    pol, ref = sharp_model("gpt2", seed=7), sharp_model("gpt2", seed=8)
    prompts = prompts_of(5, seed=4)
    cfg = GenerateConfig(method="reward-beam", num_beams=4, max_new_tokens=8, beta=0.3)
    out, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
    _, reward = score_sequences(pol, ref, prompts, [h.token_ids for h in out], PAD, 0.3)
    torch.testing.assert_close(torch.tensor([h.score for h in out]), torch.tensor(reward), atol=1e-4, rtol=1e-4)


def test_greedy_matches_transformers_and_compute_is_counted():
    model = sharp_model("llama", seed=9)
    prompts = prompts_of(4, seed=5)
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=7, pad_token_id=PAD, eos_token_id=EOS))
    out, compute = generate_ids(model, prompts, GenerateConfig(method="greedy", max_new_tokens=7), [EOS], PAD)
    for b, t in enumerate(h.token_ids for h in out):
        row = hf[b, ids.shape[1]:].tolist()
        assert t == (row[: row.index(EOS) + 1] if EOS in row else row)
    steps = max(h.num_tokens for h in out)
    assert compute.forward_passes == steps
    assert compute.tokens_processed >= sum(map(len, prompts)) + (steps - 1)


def test_filter_logits_against_slow_reference():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 12), -1)
    for k, p in [(0, 0.5), (4, 1.0), (5, 0.8), (0, 1.0)]:
        got = filter_logits(lp, 1.0, k, p)
        for i in range(3):
            # as transformers: top-k first, then top-p on the renormalised top-k distribution
            order = sorted(range(12), key=lambda j: -lp[i, j].item())[: k or 12]
            z = sum(lp[i, j].exp().item() for j in order)
            kept, mass = [], 0.0
            for j in order:
                if mass >= p:
                    break
                kept.append(j)
                mass += lp[i, j].exp().item() / z
            assert sorted(j for j in range(12) if got[i, j] > float("-inf")) == sorted(kept)


def test_draw_follows_the_weights_and_never_draws_a_zero_weight():
    w = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0]]).repeat(40000, 1)
    got = draw(w, torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=5).double() / len(got)
    want = torch.tensor([0.0, 1 / 8, 3 / 8, 0.0, 4 / 8], dtype=torch.double)
    assert freq[0] == freq[3] == 0
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / len(got)).sqrt().max()
    # the ends of [0, 1): u = 0 takes the first token with weight, u -> 1 the last
    assert draw(w[:2], u=torch.tensor([0.0, 1.0 - 1e-7])).tolist() == [1, 4]


def test_greedy_rows_leave_the_batch_when_they_end_without_changing_any_output():
    """Rows that end leave the batch (their caches are dropped); each prompt's output and log-probs equal decoding
    it alone."""
    pol, ref = sharp_model("llama", seed=22, eos_bias=1.5), sharp_model("llama", seed=21)
    prompts = prompts_of(8, seed=11)
    batched = sample(Lockstep([pol, ref]), prompts, PAD, [EOS], 12, greedy=True)
    lengths = {len(t) for t in batched.tokens}
    assert len(lengths) > 2 and min(lengths) < 12  # rows end at different steps: the batch shrinks on the way
    for i, p in enumerate(prompts):
        alone = sample(Lockstep([pol, ref]), [p], PAD, [EOS], 12, greedy=True)
        assert alone.tokens[0] == batched.tokens[i]
        for m in range(2):
            torch.testing.assert_close(alone.logps[m][0], batched.logps[m][i], atol=1e-5, rtol=1e-5)


def test_sampling_records_exact_logps_and_is_seeded():
    pol, ref = sharp_model("llama", seed=10, scale=2.0), sharp_model("llama", seed=11, scale=2.0)
    prompts = prompts_of(4, seed=6)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        runs.append(sample(Lockstep([pol, ref]), prompts, PAD, [EOS], 8, temperature=0.7, top_k=10,
                           generator=g, repeat=3))
    assert runs[0].tokens == runs[1].tokens
    s = runs[0]
    flat_p = [p for p in prompts for _ in range(3)]
    logp, reward = score_sequences(pol, ref, flat_p, s.tokens, PAD, 1.0)
    torch.testing.assert_close(torch.tensor([x.sum().item() for x in s.logps[0]]), torch.tensor(logp), atol=1e-4,
                               rtol=1e-5)
    rec = [(a - b).sum().item() for a, b in zip(s.logps[0], s.logps[1])]
    torch.testing.assert_close(torch.tensor(rec), torch.tensor(reward), atol=1e-4, rtol=1e-5)


def test_best_of_n_picks_the_best_by_its_ranking():
    pol, ref = sharp_model("llama", seed=12, scale=2.0), sharp_model("llama", seed=13, scale=2.0)
    prompts = prompts_of(3, seed=7)
    cfg = GenerateConfig(method="best-of-n", num_samples=6, max_new_tokens=6, ranking="reward", beta=0.2)
    out, compute = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref, generator=torch.Generator().manual_seed(1))
    s = sample(Lockstep([pol, ref]), prompts, PAD, [EOS], 6, generator=torch.Generator().manual_seed(1), repeat=6)
    for b in range(3):
        cands = [(0.2 * (s.logps[0][b * 6 + i] - s.logps[1][b * 6 + i]).sum().item(), s.tokens[b * 6 + i])
                 for i in range(6)]
        assert out[b].token_ids == max(cands)[1]
        assert out[b].score == pytest.approx(max(cands)[0], abs=1e-5)
    assert compute.forward_passes == 2 * max(map(len, s.tokens))  # policy and reference, one pass per step


def test_chunk_beam_with_one_candidate_is_sampling_from_the_base():
    base, tuned, untuned = (sharp_model("llama", seed=s, scale=2.0) for s in (14, 15, 16))
    prompts = prompts_of(3, seed=8)
    cfg = GenerateConfig(method="chunk-beam", num_beams=1, num_samples=1, chunk_len=3, max_new_tokens=8, beta=1.0)
    out, _ = generate_ids(tuned, prompts, cfg, [EOS], PAD, ref=untuned, base=base,
                          generator=torch.Generator().manual_seed(3))
    s = sample(Lockstep([base]), prompts, PAD, [EOS], 8, generator=torch.Generator().manual_seed(3))
    assert [h.token_ids for h in out] == s.tokens
    _, reward = score_sequences(tuned, untuned, prompts, s.tokens, PAD, 1.0)
    torch.testing.assert_close(torch.tensor([h.score for h in out]), torch.tensor(reward), atol=1e-4, rtol=1e-4)


def test_chunk_beam_prefers_higher_implicit_reward():
    base, tuned, untuned = (sharp_model("llama", seed=s, scale=2.0) for s in (17, 18, 19))
    prompts = prompts_of(6, seed=9)
    scores = {}
    for W, K in [(1, 1), (2, 4)]:
        cfg = GenerateConfig(method="chunk-beam", num_beams=W, num_samples=K, chunk_len=2, max_new_tokens=8, beta=1.0)
        out, _ = generate_ids(tuned, prompts, cfg, [EOS], PAD, ref=untuned, base=base,
                              generator=torch.Generator().manual_seed(4))
        scores[W, K] = sum(h.score for h in out) / len(out)
    assert scores[2, 4] > scores[1, 1]


@pytest.mark.parametrize("ref_term,rollout", [(True, True), (False, True), (False, False)])
def test_mcts_finds_the_exhaustive_optimum(ref_term, rollout):
    vocab, depth, beta = 5, 4, 0.5
    pol = sharp_model("llama", seed=20, vocab=vocab, scale=1.5, eos_bias=0.0)
    ref = sharp_model("llama", seed=21, vocab=vocab, scale=1.5, eos_bias=0.0)
    prompts = [[2, 3], [4], [3, 3, 2]]
    cfg = GenerateConfig(method="mcts", max_new_tokens=depth, simulations=500, expand_top_k=vocab,
                         ref_term=ref_term, beta=beta, rollout=rollout, c_puct=1.0)
    out, compute = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref)
    greedy, _ = generate_ids(pol, prompts, GenerateConfig(method="greedy", max_new_tokens=depth), [EOS], PAD)
    found_beyond_greedy = 0
    for p, h, g in zip(prompts, out, greedy):
        best, best_ret, _ = enumerate_best(pol, ref, p, vocab, depth, beta, ref_term)
        assert h.token_ids == best
        assert h.score == pytest.approx(best_ret, abs=1e-4)
        found_beyond_greedy += g.token_ids != best
    assert found_beyond_greedy >= 1  # the optimum is not simply the policy's greedy answer
    assert compute.forward_passes > 0


def test_wide_beam_finds_the_exhaustive_optimum():
    vocab, depth = 5, 4
    pol = sharp_model("llama", seed=22, vocab=vocab, scale=1.0, eos_bias=0.0)
    for p in ([2, 3], [4, 4]):
        best, _, seqs = enumerate_best(pol, None, p, vocab, depth, 1.0)
        hyps = beam_search(Lockstep([pol]), [p], PAD, [EOS], len(seqs), depth, lambda l: l[0])
        assert hyps[0][0].token_ids == best


def _direct_guided_logps(base, tuned, ref, seq, alpha):
    """Eq. 14 written out for one sequence without caches: log of pi_base * (pi_tuned/pi_ref)^alpha / Z at its
    last position, from one full forward of each model."""
    x = torch.tensor([seq])
    lp = [torch.log_softmax(m(input_ids=x).logits[0, -1].double(), -1) for m in (base, tuned, ref)]
    w = lp[0].exp() * (lp[1].exp() / lp[2].exp()) ** alpha
    return (w / w.sum()).log()


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_guided_greedy_follows_the_combined_distribution(alpha):
    base, tuned, ref = (sharp_model("llama", seed=s, scale=2.0) for s in (50, 51, 52))
    prompts = prompts_of(4, seed=12)
    cfg = GenerateConfig(method="guided", alpha=alpha, max_new_tokens=6)
    with torch.no_grad():
        out, compute = generate_ids(tuned, prompts, cfg, [EOS], PAD, ref=ref, base=base)
        for p, h in zip(prompts, out):
            toks, score, lp_tuned, lp_ref = h.token_ids, h.score, h.logp, h.ref_logp
            total = 0.0
            for t, a in enumerate(toks):
                d = _direct_guided_logps(base, tuned, ref, p + toks[:t], alpha)
                assert a == int(d.argmax())  # each token is the argmax of the combined distribution
                total += float(d[a])
            assert score == pytest.approx(total, abs=1e-4)  # score: log of the steered probability of y
            lt, lr = score_sequences(tuned, ref, [p], [toks], PAD, 1.0)
            assert lp_tuned == pytest.approx(lt[0], abs=1e-4)
            assert lp_tuned - lp_ref == pytest.approx(lr[0], abs=1e-4)
    if alpha == 0.0:  # alpha = 0 is the base alone
        g, _ = generate_ids(base, prompts, GenerateConfig(method="greedy", max_new_tokens=6), [EOS], PAD)
        assert [h.token_ids for h in out] == [h.token_ids for h in g]
    assert compute.forward_passes == 3 * max(h.num_tokens for h in out)  # three models in lockstep, one pass a step


def test_guided_sampling_draws_from_the_combined_distribution():
    """Sampled first tokens follow pi_base * (pi_tuned/pi_ref)^alpha: their frequencies over many draws match it."""
    base, tuned, ref = (sharp_model("llama", seed=s, scale=1.5) for s in (53, 54, 55))
    prompt, n, alpha = [5, 9], 4000, 1.5
    cfg = GenerateConfig(method="guided", alpha=alpha, do_sample=True, max_new_tokens=1, batch_size=n)
    with torch.no_grad():
        out, _ = generate_ids(tuned, [prompt] * n, cfg, [EOS], PAD, ref=ref, base=base,
                              generator=torch.Generator().manual_seed(0))
        want = _direct_guided_logps(base, tuned, ref, prompt, alpha).exp()
        tuned_alone = torch.softmax(tuned(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    freq = torch.bincount(torch.tensor([h.token_ids[0] for h in out]), minlength=V).double() / n
    tol = 4 * (want * (1 - want) / n).sqrt().max() + 1e-3
    assert (freq - want).abs().max() < tol
    # a test that could tell the combined law from the tuned one: no frequencies lie within tol of both
    assert (want - tuned_alone).abs().max() > 2 * tol


@pytest.mark.parametrize("method", ["greedy", "sample", "beam", "reward-beam", "best-of-n", "chunk-beam", "guided",
                                    "mcts"])
def test_generate_carries_the_log_probs_the_search_computed(method, tokenizer):
    """log pi(y|x) and the implicit reward come from the search itself (no rescoring pass, except where the search
    never ran a model, which is counted), and equal a fresh rescoring of the returned tokens."""
    from r2q.search import encode_prompts, generate

    pol, ref = tiny_model("llama", len(tokenizer), seed=30), tiny_model("llama", len(tokenizer), seed=31)
    prompts = ["the film", "12+30=", "a"]
    cfg = GenerateConfig(method=method, max_new_tokens=7, num_beams=3, num_samples=3, chunk_len=3, simulations=6,
                         beta=0.3, seed=1)
    res, total = generate(pol, tokenizer, prompts, cfg, ref=ref)
    enc = encode_prompts(tokenizer, prompts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    logp, reward = score_sequences(pol, ref, enc, [r.token_ids for r in res], pad, 0.3)
    torch.testing.assert_close(torch.tensor([r.logp for r in res]), torch.tensor(logp), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([r.reward for r in res]), torch.tensor(reward), atol=1e-4, rtol=1e-4)
    # rescoring forwards are counted: beam never runs the reference (one pass to score it), MCTS keeps no
    # per-path log-probs (one pass per model); every other method carries both
    searched = generate_ids(pol, enc, cfg, [eos], pad, ref=ref, tokenizer=tokenizer,
                            generator=torch.Generator().manual_seed(1))[1]
    rescoring = {"beam": 1, "mcts": 2}.get(method, 0)
    assert total["forward_passes"] == searched.forward_passes + rescoring


def test_mcts_rollout_len_caps_the_cost_per_simulation():
    pol, ref = sharp_model("llama", seed=40, scale=2.0, eos_bias=-3.0), sharp_model("llama", seed=41, scale=2.0)
    prompts = prompts_of(3, seed=9)
    base = dict(method="mcts", max_new_tokens=12, simulations=6, expand_top_k=4, beta=0.3)
    full, c_full = generate_ids(pol, prompts, GenerateConfig(**base, rollout_len=0), [EOS], PAD, ref=ref)
    same, _ = generate_ids(pol, prompts, GenerateConfig(**base, rollout_len=12), [EOS], PAD, ref=ref)
    assert same == full  # a cap at the length limit changes nothing
    capped, c_cap = generate_ids(pol, prompts, GenerateConfig(**base, rollout_len=2), [EOS], PAD, ref=ref)
    # prefill, per simulation one expansion step and at most one more rollout step, and one greedy finish of an
    # answer that is still incomplete (at most 11 steps), for both models
    assert c_cap.forward_passes <= 2 + 6 * 2 * 2 + 2 * 11 < c_full.forward_passes
    assert all(h.token_ids[-1] == EOS or h.num_tokens == 12 for h in capped)  # every answer is a complete sequence


@pytest.mark.parametrize("method", ["greedy", "sample", "guided", "best-of-n", "beam", "reward-beam", "chunk-beam",
                                    "mcts"])
def test_cost_per_prompt_is_what_a_search_spends_when_nothing_ends_early(method, tokenizer):
    """The cost model --budget solves is exact when no output ends before --max-new-tokens (an upper bound for
    MCTS, whose simulations can end on already-expanded terminal nodes), rescoring passes included."""
    from r2q.search import cost_per_prompt, encode_prompts, generate

    pol, ref = tiny_model("llama", len(tokenizer), seed=60), tiny_model("llama", len(tokenizer), seed=61)
    prompts = ["the film was", "a", "12+30="]
    cfg = GenerateConfig(method=method, max_new_tokens=5, num_beams=3, num_samples=2, simulations=4, beta=0.3)
    res, total = generate(pol, tokenizer, prompts, cfg, ref=ref)
    assert all(len(r.token_ids) == 5 and tokenizer.eos_token_id not in r.token_ids for r in res)  # none ended early
    enc = encode_prompts(tokenizer, prompts)
    width = getattr(cfg, {"mcts": "simulations", "best-of-n": "num_samples"}.get(method, "num_beams"))
    want = sum(a + b * width for a, b in (cost_per_prompt(cfg, len(p), True) for p in enc))
    if method == "mcts":
        assert 0 < total["tokens_processed"] <= want
    else:
        assert total["tokens_processed"] == want


@pytest.mark.parametrize("method", ["best-of-n", "beam", "reward-beam", "chunk-beam", "mcts"])
def test_budget_sets_the_widest_search_that_fits(method, tokenizer):
    from r2q.errors import UserError
    from r2q.search import WIDTH, cost_per_prompt, encode_prompts, generate

    pol, ref = tiny_model("llama", len(tokenizer), seed=60), tiny_model("llama", len(tokenizer), seed=61)
    prompts = ["the film was", "a", "12+30="]
    enc = encode_prompts(tokenizer, prompts)
    P = sum(map(len, enc)) / len(enc)
    for budget in (150, 400):
        cfg = GenerateConfig(method=method, max_new_tokens=5, num_samples=2, rollout_len=3, beta=0.3, budget=budget)
        res, total = generate(pol, tokenizer, prompts, cfg, ref=ref)
        a, b = cost_per_prompt(cfg, P, True)
        w = total["width"]
        assert a + b * w <= budget < a + b * (w + 1)  # the widest that fits
        assert total["tokens_processed"] <= budget * len(prompts)
    assert total["width"] > 1  # the larger budget buys a real search
    with pytest.raises(UserError, match="below the cost"):
        generate(pol, tokenizer, prompts, GenerateConfig(method=method, max_new_tokens=5, budget=3), ref=ref)
    assert WIDTH[method] in GenerateConfig.__dataclass_fields__


def test_budget_is_refused_for_methods_without_a_width():
    from r2q.errors import UserError
    with pytest.raises(UserError, match="greedy has none"):  # making the config checks it: nothing is loaded
        GenerateConfig(method="greedy", budget=100)


def test_new_beams_sit_in_their_parents_slots():
    from r2q.search.beam import _stay_in_place

    rng = random.Random(0)
    for _ in range(200):
        parents = [rng.randrange(6) for _ in range(6)]
        order = _stay_in_place(parents)
        assert sorted(order) == list(range(6))  # a permutation of the children
        placed = [parents[c] for c in order]  # the parent of the child in each slot
        for p in set(parents):
            assert placed[p] == p  # some child of parent p stays in p's slot


def test_chunked_top_k_is_torch_topk_of_the_full_sum():
    from r2q.search.beam import _top_k

    def full(scores, running, k):
        B, K = running.shape
        return torch.topk((scores.view(B, K, -1) + running[:, :, None]).view(B, -1), k)

    g = torch.Generator().manual_seed(0)
    for (K, n), k in itertools.product(((1, 100), (1, 2048), (4, 4096), (4, 4096 + 37), (16, 5000 + 255),
                                        (2, 3000)), (1, 8, 32, 64)):
        B = 5
        scores, running = torch.randn(B * K, n, generator=g), torch.randn(B, K, generator=g) * 3
        assert all(map(torch.equal, _top_k(scores, running, k), full(scores, running, k)))  # no ties: same indices
        tail = scores.clone()
        tail.view(B, K, n)[:, -1, -1] = 1e9  # the tail past a beam's last whole chunk is searched
        assert torch.equal(_top_k(tail, running, k)[1][:, 0], torch.full((B,), K * n - 1))
        # many equal values: the same values, rank by rank, and k distinct elements that hold them
        ties = torch.randint(0, 5, (B * K, n), generator=g).float()
        level = torch.randint(0, 3, (B, K), generator=g).float()
        values, idx = _top_k(ties, level, k)
        sums = (ties.view(B, K, n) + level[:, :, None]).view(B, -1)
        assert torch.equal(values, full(ties, level, k).values) and torch.equal(sums.gather(1, idx), values)
        assert all(len(set(row)) == k for row in idx.tolist())


def test_shared_depth_is_how_many_first_tokens_two_beams_share():
    from r2q.search.beam import shared_depth, tokens_of

    def ancestors(node):
        out = []
        while node is not None:
            out.append(node)
            node = node[0]
        return out[::-1]

    rng = random.Random(1)
    for _ in range(100):  # beams grown as a search grows them: each step, every beam continues some beam
        beams, depth = [None] * 5, rng.randint(1, 9)
        for _ in range(depth):
            beams = [(beams[rng.randrange(5)], rng.randrange(3)) for _ in range(5)]
        for a, b in itertools.product(beams, beams):
            ta, tb = tokens_of(a), tokens_of(b)
            assert len(ta) == depth
            want = next((j for j in range(depth) if ta[j] != tb[j]), depth)
            chain_a, chain_b = ancestors(a), ancestors(b)  # the node at each depth 1..depth
            common = max([d for d in range(1, depth + 1) if chain_a[d - 1] is chain_b[d - 1]], default=0)
            assert shared_depth(a, b, depth) == common
            assert common <= want  # what the reorder leaves in place is the same tokens in both rows
        assert all(shared_depth(a, a, depth) == depth for a in beams)


def test_buffered_moves_equal_a_full_reorder_where_rows_agree_with_their_sources_before_their_starts():
    from transformers import DynamicCache

    from r2q.search.cache import BufferedLayer, Moves, reorder

    g = torch.Generator().manual_seed(2)
    rng = random.Random(2)
    paths, tried = set(), 0
    for _ in range(60):
        rows, n = 6, 9
        keep = rng.randint(1, rows)
        idx = [rng.randrange(rows) for _ in range(keep)]
        starts = [rng.randint(0, n) for _ in range(keep)]
        k = torch.randn(rows, 2, n, 3, generator=g)
        for i, (j, a) in enumerate(zip(idx, starts)):  # row i agrees with its source before its start
            k[i, :, :a] = k[j, :, :a]
        if any(not torch.equal(k[i, :, :a], k[j, :, :a]) for i, (j, a) in enumerate(zip(idx, starts))):
            continue  # (a source changed after it was copied from: a state no search makes)
        tried += 1
        v = k * 2 + 1
        cache = DynamicCache()
        cache.layers = [BufferedLayer(), BufferedLayer()]
        for layer in range(2):
            cache.update(k[:, :, :5].clone(), v[:, :, :5].clone(), layer)
            cache.update(k[:, :, 5:].clone(), v[:, :, 5:].clone(), layer)  # into the room allocated at step 1
        plan = Moves.of(idx, starts, rows, n, None)
        paths.add("full" if plan.full is not None else "moves" if plan.pos is not None else "none")
        reorder([cache], torch.tensor(idx), starts)
        for layer in cache.layers:
            assert torch.equal(layer.keys, k[idx]) and torch.equal(layer.values, v[idx]), (idx, starts)
        cache.update(k[:keep, :, :1] + 7, v[:keep, :, :1] + 7, 0)  # and the room is still there
        assert torch.equal(cache.layers[0].keys[:, :, -1:], k[:keep, :, :1] + 7)
    assert paths == {"full", "moves", "none"} and tried > 30


def test_beam_search_moving_only_what_beams_do_not_share_is_bitwise_the_full_reorder(monkeypatch):
    import r2q.search.cache as cache_mod

    pol, ref = sharp_model("llama", seed=9), sharp_model("llama", seed=10, scale=3.0)
    prompts = prompts_of(6, seed=5)
    runs, starts, real = [], [], cache_mod.reorder
    monkeypatch.setattr(cache_mod, "reorder", lambda c, idx, s=None: (starts.append(s), real(c, idx, s)))
    for full in (False, True):
        if full:  # every reorder moves every position of every row
            monkeypatch.setattr(cache_mod, "reorder", lambda cs, idx, s=None: [c.reorder_cache(idx) for c in cs])
        out = []
        for method, K in (("beam", 4), ("beam", 8), ("reward-beam", 4)):
            cfg = GenerateConfig(method=method, num_beams=K, max_new_tokens=12, beta=0.3)
            hyps, _ = generate_ids(pol, prompts, cfg, [EOS], PAD, ref=ref if method == "reward-beam" else None)
            out.append([(h.token_ids, h.score, h.logp, h.ref_logp) for h in hyps])
        runs.append(out)
    T = max(map(len, prompts))
    assert max(min(s) for s in starts if s) > T + 2  # beams shared generated tokens, which stayed in place
    assert any(0 in s and max(s) > T for s in starts if s)  # prompts left the batch: rows moved whole, others not
    assert runs[0] == runs[1]  # the same tokens, and floats equal to the last bit


@pytest.mark.parametrize("opt, bad", [("--shapes", "12m,bogus"), ("--parts", "beam,mctss")])
def test_search_benchmark_refuses_unknown_names_in_one_line(opt, bad):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "search_vs_hf.py"
    out = subprocess.run([sys.executable, str(script), opt, bad], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(f"{bad.split(',')[1]} not among " + (
        "12m, 32k, demo" if opt == "--shapes" else "beam, methods, mcts"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lockstep_log_probs_are_the_log_softmax_of_the_logits(dtype):
    """The lockstep takes the log-softmax in place over the model's own logits (fp32) or their fp32 copy: the
    values of torch.log_softmax over a new tensor, bit for bit, and the model's next call is unaffected."""
    model = sharp_model("llama", seed=5).to(dtype)
    ids, mask = left_pad(prompts_of(4, seed=2), PAD)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        lock = Lockstep([model])
        first = lock.prefill(ids, mask)[0]
        assert torch.equal(first, torch.log_softmax(logits, dim=-1))
        again = Lockstep([model]).prefill(ids, mask)[0]
        assert torch.equal(again, first)


def test_search_parts_benchmark_accounts_for_the_whole_search(tmp_path):
    """benchmarks/search_parts.py on a short search: its parts are each positive, and with the rest of the loop they
    add up to the search's wall time (the rest is what the named parts leave, so it cannot be negative)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "search_parts.py"
    out = tmp_path / "parts.json"
    run = subprocess.run([sys.executable, str(script), "--shape", "12m", "--K", "4", "--repeats", "1",
                          "--new-tokens", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(out.read_text())
    parts = {k: v for k, v in row["parts_ms"].items() if k != "search"}
    assert row["model_calls"] == 3 and all(v > 0 for v in parts.values()), parts
    assert abs(sum(parts.values()) - row["search_ms"]) < 1e-6 * row["search_ms"]
    assert parts["forwards"] > 0.5 * row["search_ms"] and row["overhead"] > 0

"""r2q.credit: per-token numbers equal a plain transformers forward, pair sums equal the trainer's metrics, the
training reference cache is used, bad inputs are one-line errors, and a DPO-trained model puts its most
negative reward on the one wrong digit of an arithmetic answer (the paper's credit-assignment finding)."""

import copy
import json
import math
import random

import pytest
import torch

from r2q.cli import run_credit as _run_credit
from r2q.credit import CreditConfig, credit_from_file, score_examples, score_pairs, score_texts
from r2q.data import SFTExample, preference_examples_from_rows, sft_examples_from_rows
from r2q.errors import UserError
from r2q.models import load_model
from r2q.tokens import token_pieces
from r2q.toy import save_model, tiny_model, train_bpe_tokenizer
from r2q.train import TrainConfig, Trainer, train

ROWS = [
    {"prompt": "the movie was", "chosen": " great.\nreally fun.\nloved it", "rejected": " boring.\nbad acting"},
    {"prompt": "12+30=", "chosen": "42", "rejected": "43"},
    {"prompt": "a film", "chosen": " good.", "rejected": " good. very long and dull ending"},
    {"prompt": "the plot was not quite good and the acting was very bad, the worst", "chosen": " story",
     "rejected": " scene\n"},
    {"prompt": "x", "chosen": " é music\tnot", "rejected": " best best best"},
]


@pytest.fixture(scope="module")
def models(llama_dir, llama_ref_dir):
    return load_model(llama_dir).eval(), load_model(llama_ref_dir).eval()


def plain_logps(model, prompt_ids, comp_ids):
    """log pi(a_t|s_t) of each completion token from one unpadded full forward, in a Python loop."""
    ids = torch.tensor([list(prompt_ids) + list(comp_ids)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    P = len(prompt_ids)
    return [logp[P + t - 1, comp_ids[t]].item() for t in range(len(comp_ids))]


def check_completion(d, policy, ref, tok, prompt, text, beta, delimiter="\n"):
    prompt_ids = tok(prompt).input_ids
    comp_ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert d["token_ids"] == comp_ids
    assert "".join(d["tokens"]) == tok.decode(comp_ids) == d["text"]
    lp, lr = plain_logps(policy, prompt_ids, comp_ids), plain_logps(ref, prompt_ids, comp_ids)
    r = [beta * (a - b) for a, b in zip(lp, lr)]
    assert d["logps"] == pytest.approx(lp, abs=1e-5)
    assert d["ref_logps"] == pytest.approx(lr, abs=1e-5)
    assert d["rewards"] == pytest.approx(r, abs=1e-5)
    q, total, steps, cur = [], 0.0, [], 0.0
    for piece, x in zip(d["tokens"], r):
        total += x
        cur += x
        q.append(total)
        if delimiter in piece:
            steps.append(cur)
            cur = 0.0
    if not steps or delimiter not in d["tokens"][-1]:
        steps.append(cur)
    assert d["cumulative"] == pytest.approx(q, abs=1e-5)
    assert d["reward"] == pytest.approx(total, abs=1e-5)
    assert d["step_rewards"] == pytest.approx(steps, abs=1e-5)
    return total


@pytest.mark.parametrize("share_prefix", [True, False])
def test_json_matches_plain_forward_passes(models, tokenizer, tmp_path, share_prefix):
    policy, ref = models
    beta = 0.3
    rep = score_pairs(policy, ref, tokenizer, ROWS, beta, batch_size=2, share_prefix=share_prefix, use_cache=False)
    d = json.loads(rep.to_json(tmp_path / "credit.json").read_text())
    assert d["kind"] == "pairs" and len(d["pairs"]) == len(ROWS) and d["ref_source"] == "model"
    losses, margins = [], []
    for row, p in zip(ROWS, d["pairs"]):
        Rc = check_completion(p["chosen"], policy, ref, tokenizer, row["prompt"], row["chosen"], beta)
        Rr = check_completion(p["rejected"], policy, ref, tokenizer, row["prompt"], row["rejected"], beta)
        assert p["margin"] == pytest.approx(Rc - Rr, abs=1e-5)
        assert p["correct"] == (Rc > Rr)
        assert p["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-(Rc - Rr)))), abs=1e-5)
        losses.append(p["loss"])
        margins.append(Rc - Rr)
    for p in d["pairs"]:
        for c in (p["chosen"], p["rejected"]):
            n = len(c["tokens"])
            assert c["step_ends"] == [t for t in range(n - 1) if "\n" in c["tokens"][t]] + [n - 1]
        a, b = p["chosen"]["token_ids"], p["rejected"]["token_ids"]
        assert p["first_diff"] == next(t for t in range(len(a)) if a[t] != b[t])
    assert len(d["pairs"][0]["chosen"]["step_rewards"]) == 3
    s = d["summary"]
    assert s["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert s["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-6)
    # the token table: means of the per-token rewards over every place each token is scored
    first = d["top_negative"][0]
    seen = [x for p in d["pairs"] for c in (p["chosen"], p["rejected"])
            for t, x in zip(c["token_ids"], c["rewards"]) if t == first["token_id"]]
    assert first["count"] == len(seen) and first["mean_reward"] == pytest.approx(sum(seen) / len(seen), abs=1e-6)
    assert min(x["mean_reward"] for x in d["top_negative"]) == first["mean_reward"]


def test_plain_completions_and_reference_free(models, gpt2_dir, tokenizer):
    policy, ref = models
    rep = score_texts(policy, ref, tokenizer, ["the film", "12+1="], [" was good.\nthe end", "13"], 0.1)
    d = rep.to_dict()
    assert d["kind"] == "completions" and "pairs" not in d
    check_completion(d["completions"][0], policy, ref, tokenizer, "the film", " was good.\nthe end", 0.1)
    gpt2 = load_model(gpt2_dir).eval()
    free = score_texts(gpt2, None, tokenizer, ["the film"], [" was good."], 0.1).completions[0]
    assert free.ref_logps is None
    assert free.rewards == pytest.approx([0.1 * x for x in free.logps], abs=1e-7)  # r_t = beta * log pi
    assert free.reward < 0


def test_pair_sums_match_trainer_metrics(llama_dir, models, tokenizer, tmp_path):
    """Trainer.evaluate's means (loss, rewards/*) over the same pairs equal credit's summary."""
    _, ref = models
    examples, _ = preference_examples_from_rows(ROWS, tokenizer)
    beta = 0.25
    cfg = TrainConfig(out=str(tmp_path / "t"), beta=beta, batch_size=3, quiet=True)
    trainer = Trainer(cfg, "dpo", model=load_model(llama_dir), tokenizer=tokenizer, ref_model=copy.deepcopy(ref),
                      train_examples=examples, eval_examples=examples)
    metrics = trainer.evaluate()
    summary = score_examples(load_model(llama_dir), ref, tokenizer, examples, beta, use_cache=False).summary
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert summary[key] == pytest.approx(metrics[key], abs=1e-5), key


def test_uses_the_training_reference_cache(llama_dir, llama_ref_dir, tokenizer, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cache = tmp_path / "cache"
    train(TrainConfig(model=str(llama_dir), data=str(data), out=str(tmp_path / "run"), ref=str(llama_ref_dir),
                      precompute_ref=True, cache_dir=str(cache), max_steps=1, batch_size=2, quiet=True))
    assert len(list(cache.glob("*.safetensors"))) == 1
    policy, ref = load_model(llama_dir).eval(), load_model(llama_ref_dir).eval()
    live = credit_from_file(policy, ref, tokenizer, data, 0.1, use_cache=False)

    import r2q.credit as credit

    scored = []
    real = credit._logps
    monkeypatch.setattr(credit, "_logps", lambda m, b: scored.append(m) or real(m, b))
    cached = credit_from_file(policy, ref, tokenizer, data, 0.1, cache_dir=cache)
    assert cached.ref_source == "cache" and all(m is policy for m in scored)  # the reference never ran
    for a, b in zip(live.items(), cached.items()):
        assert a.ref_logps == pytest.approx(b.ref_logps, abs=1e-5)
        assert a.rewards == pytest.approx(b.rewards, abs=1e-5)
    out = run_credit(model=str(llama_dir), ref=str(llama_ref_dir), beta=0.1, data=str(data), cache_dir=str(cache),
                     quiet=True, show=0, json=str(tmp_path / "c.json"), html=str(tmp_path / "c.html"),
                     png=str(tmp_path / "c.png"))
    assert out["ref_source"] == "cache" and json.loads((tmp_path / "c.json").read_text()) == out
    assert (tmp_path / "c.html").stat().st_size > 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    # a different data set misses the cache and runs the reference
    other = run_credit(model=str(llama_dir), ref=str(llama_ref_dir), beta=0.1, prompt="the film",
                       response=" was good.", cache_dir=str(cache), quiet=True, show=0)
    assert other["ref_source"] == "model" and len(other["completions"]) == 1


def test_run_credit_reads_beta_and_reference_from_the_training_run(llama_dir, tokenizer, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    train(TrainConfig(model=str(llama_dir), data=str(data), out=str(tmp_path / "run"), beta=0.4, max_steps=2,
                      batch_size=2, lr=1e-3, quiet=True, cache_dir=str(tmp_path / "cache")))
    out = run_credit(model=str(tmp_path / "run"), data=str(data), quiet=True, cache_dir=str(tmp_path / "cache"))
    assert out["beta"] == 0.4 and out["meta"]["ref"] == str(llama_dir)  # ref 'init': the starting model
    assert "rewards/accuracies" in capsys.readouterr().out


def test_user_errors(llama_dir, tmp_path):
    other_tok = train_bpe_tokenizer(["zebra yak xylophone " * 5, "0123456789"], vocab_size=300)
    other = save_model(tiny_model("llama", len(other_tok)), other_tok, tmp_path / "other")
    with pytest.raises(UserError, match="tokenizers differ"):
        run_credit(model=str(llama_dir), ref=str(other), prompt="a", response="b", quiet=True, show=0)
    with pytest.raises(UserError, match="either --data"):
        run_credit(model=str(llama_dir), ref=str(llama_dir), quiet=True)
    with pytest.raises(UserError, match="go together"):
        run_credit(model=str(llama_dir), ref=str(llama_dir), prompt="a", quiet=True)
    with pytest.raises(UserError, match="--ref is required"):
        run_credit(model=str(llama_dir), prompt="a", response="b", quiet=True)
    with pytest.raises(UserError, match="--beta must be greater than 0"):
        run_credit(model=str(llama_dir), ref=str(llama_dir), beta=-1.0, prompt="a", response="b", quiet=True)


def run_credit(**kw):
    return _run_credit(CreditConfig(**kw))


def test_token_pieces_join_to_the_decoded_text(tokenizer):
    for text in [" was good.\n\nthe end", "é😀 ü\tx", "12+34=46<|endoftext|>", "  spaces  "]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pieces = token_pieces(tokenizer, ids, context=tokenizer("the film").input_ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------- arithmetic


def _problems(n, rng, exclude=()):
    """Two-digit sums without carries, so each answer digit is the sum of two operand digits."""
    seen, out = set(exclude), []
    while len(out) < n:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        if (a, b) in seen or any(int(x) + int(y) > 9 for x, y in zip(str(a), str(b))):
            continue
        seen.add((a, b))
        out.append((a, b))
    return out


def _pair(a, b, rng):
    """A correct answer and the same answer with digit k wrong: (row, k)."""
    c = str(a + b)
    k = rng.randrange(len(c))
    wrong = rng.choice([d for d in "0123456789" if d != c[k] and not (k == 0 and d == "0")])
    return {"prompt": f"{a}+{b}=", "chosen": c, "rejected": c[:k] + wrong + c[k + 1:]}, k


@pytest.mark.slow
def test_credit_lands_on_the_wrong_digit(tmp_path):
    """SFT a reference on sums, DPO on pairs differing in one digit, then on held-out problems the most
    negative token reward of the rejected answer is its wrong digit in at least 90% of pairs.

    The reference also learns to continue after a typo, as a pretrained model would: the units digit is still
    the sum of the units digits, and EOS follows two digits. A reference that is clueless after an error lets
    DPO lower those off-distribution tokens instead (76-95 hits over 4 seeds in our runs). beta = 1 rather
    than the paper's 0.1 makes the loss saturate at smaller log-ratios; with 0.1 the tiny model over-optimises
    and moves the blame onto the EOS after the wrong answer, a verification shortcut (0.5: 88-100 hits).
    With these settings 10 seeds gave 95-100 hits out of 100.
    """
    tok = train_bpe_tokenizer(["0123456789+="], vocab_size=257, chat_template=None)  # bytes only, no merges
    assert [len(tok.decode([i])) for i in tok("12+34=46", add_special_tokens=False).input_ids] == [1] * 8
    rng = random.Random(0)
    train_problems = _problems(800, rng)
    heldout = _problems(100, random.Random(1), exclude=train_problems)
    pairs = [_pair(a, b, rng)[0] for a, b in train_problems]

    def typo(digit: str, allowed: str = "0123456789") -> str:
        return rng.choice([d for d in allowed if d != digit])

    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    sft_rows += [{"prompt": r["prompt"] + typo(r["chosen"][0], "123456789"), "completion": r["chosen"][1]}
                 for r in pairs for _ in range(2)]
    sft, _ = sft_examples_from_rows(sft_rows, tok)
    sft += [SFTExample(tok(r["prompt"] + r["chosen"][0] + typo(r["chosen"][1])).input_ids, [tok.eos_token_id], 0)
            for r in pairs]
    model = tiny_model("llama", len(tok), seed=0)
    model = train(TrainConfig(out=str(tmp_path / "sft"), lr=3e-3, batch_size=64, max_steps=600, warmup_steps=10,
                              quiet=True), "sft", model=model, tokenizer=tok, train_examples=sft).model
    ref = copy.deepcopy(model).eval()
    beta = 1.0
    examples, _ = preference_examples_from_rows(pairs, tok)
    res = train(TrainConfig(out=str(tmp_path / "dpo"), lr=1e-3, beta=beta, batch_size=32, max_steps=200,
                            warmup_steps=5, quiet=True), "dpo", model=model, tokenizer=tok, train_examples=examples)
    test_rows, ks = zip(*(_pair(a, b, rng) for a, b in heldout))
    rep = score_pairs(res.model, ref, tok, list(test_rows), beta, use_cache=False)
    hits = 0
    for p, k in zip(rep.pairs, ks):
        r = p.rejected.rewards
        assert len(r) == 3 and p.first_diff == k  # two digits + EOS
        hits += r[k] < 0 and min(range(len(r)), key=r.__getitem__) == k
    assert hits >= 90, f"the wrong digit got the most negative reward in {hits}/100 held-out pairs"


def test_best_of_n_cuts_steps_where_credit_does(llama_dir, llama_ref_dir, tokenizer):
    """reward-min / reward-last rank by the same steps `r2q credit` shows (one way of cutting text into steps)."""
    from r2q.search.bon import sample_scores

    policy, ref = load_model(llama_dir).eval(), load_model(llama_ref_dir).eval()
    prompt = tokenizer("the film").input_ids
    texts = [" was good.\nthe end\n\nreally", " é😀 bad\n12+34=46\n", " no steps at all"]
    comps = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    rep = score_examples(policy, ref, tokenizer, [SFTExample(prompt, c, i) for i, c in enumerate(comps)], 0.1,
                         delimiter="\n", use_cache=False)
    pol = [torch.tensor(c.logps) for c in rep.completions]
    refl = [torch.tensor(c.ref_logps) for c in rep.completions]
    for how, pick in (("reward-min", min), ("reward-last", lambda s: s[-1])):
        got = sample_scores(comps, pol, refl, 0.1, how, tokenizer, "\n", [prompt] * len(comps))
        want = [pick(c.step_rewards) for c in rep.completions]
        assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert [len(c.step_rewards) for c in rep.completions] == [4, 3, 1]


CONVERSATION = [
    {"prompt": [{"role": "user", "content": "was the film good?"}],
     "completion": [{"role": "assistant", "content": "it was good, the acting was great"},
                    {"role": "user", "content": "and the plot?"},
                    {"role": "assistant", "content": "the plot was very good too"}]},
]


def test_credit_is_summed_per_turn_in_conversations(models, tokenizer, tmp_path):
    """A conversation of several messages: each message is a step (per-turn credit). The turns partition the
    tokens (they sum to R, and each turn's tokens spell that message), and editing the last assistant turn leaves
    the earlier turns' rewards exactly as they were (rewards are causal) while its own reward changes."""
    from rich.console import Console

    from r2q.views.html import render_html
    from r2q.views.terminal import render_terminal

    policy, ref = models
    edited = json.loads(json.dumps(CONVERSATION))
    edited[0]["completion"][2]["content"] = "the plot was bad and dull, the worst"
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATION + edited))
    rep = credit_from_file(policy, ref, tokenizer, data, 0.5, use_cache=False)
    a, b = rep.completions
    for c, msgs in ((a, CONVERSATION[0]["completion"]), (b, edited[0]["completion"])):
        assert c.step_roles == ["assistant", "user", "assistant"]
        assert sum(c.step_rewards) == pytest.approx(c.reward, abs=1e-5)
        starts = [0] + [e + 1 for e in c.step_ends[:-1]]
        spans = ["".join(c.tokens[s : e + 1]) for s, e in zip(starts, c.step_ends)]
        for span, m in zip(spans, msgs):
            assert m["content"] in span  # the step holds its message
        assert msgs[1]["content"] not in spans[0] and msgs[0]["content"] not in spans[1]
        # the step reward is the plain sum of its tokens' rewards
        assert c.step_rewards == pytest.approx([sum(c.rewards[s : e + 1]) for s, e in zip(starts, c.step_ends)],
                                               abs=1e-5)
    assert a.step_rewards[:2] == pytest.approx(b.step_rewards[:2], abs=1e-5)  # the unedited turns
    assert a.step_ends[:2] == b.step_ends[:2]
    assert abs(a.step_rewards[2] - b.step_rewards[2]) > 1e-3  # the edited turn
    # one message (the usual completion) keeps delimiter steps: no roles
    single = credit_from_file(policy, ref, tokenizer, _rows(tmp_path, [{
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "a\nb"}]}]), 0.5, use_cache=False)
    assert single.completions[0].step_roles is None
    # JSON, terminal and HTML show the turns with their roles
    saved = json.loads(rep.to_json(tmp_path / "c.json").read_text())
    assert saved["completions"][0]["step_roles"] == ["assistant", "user", "assistant"]
    console = Console(record=True, width=200)
    render_terminal(rep, console, max_items=2)
    assert "turns: assistant " in console.export_text()
    assert "turns: assistant " in render_html(rep)


def _rows(tmp_path, rows):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_best_of_n_takes_turns_as_steps_at_an_end_of_turn_token(tokenizer):
    """With a chat template that closes each message with an end-of-turn token that is also the EOS (as chat models
    stop), --delimiter set to that token makes best-of-n's reward-min / reward-last rank by the same per-turn
    rewards credit reports."""
    from r2q.search.bon import sample_scores

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.eos_token = "<|end|>"
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    policy, ref = tiny_model("llama", len(tok), seed=70).eval(), tiny_model("llama", len(tok), seed=71).eval()
    ex, _ = sft_examples_from_rows(CONVERSATION, tok)
    rep = score_examples(policy, ref, tok, ex, 0.5, use_cache=False)
    c = rep.completions[0]
    assert c.step_roles == ["assistant", "user", "assistant"]
    toks = [ex[0].completion_ids]
    pol, refl = [torch.tensor(c.logps)], [torch.tensor(c.ref_logps)]
    for how, pick in (("reward-min", min), ("reward-last", lambda s: s[-1])):
        got = sample_scores(toks, pol, refl, 0.5, how, tok, "<|end|>", [ex[0].prompt_ids])
        assert float(got[0]) == pytest.approx(pick(c.step_rewards), abs=1e-5)


def test_each_completion_carries_its_implicit_prm_scores(models, tokenizer):
    """The per-step output a PRM user reads: step rewards, and their min / sum / last (sum = the reward)."""
    pol, ref = models
    rep = score_texts(pol, ref, tokenizer, ["12+7=", "3+4="], ["2+7=9\n1+0=1\n19", "3+4=7"], 0.1)
    multi, single = rep.completions
    assert len(multi.step_rewards) == 3 and len(single.step_rewards) == 1
    for c in rep.completions:
        assert c.prm["min"] == pytest.approx(min(c.step_rewards), abs=1e-6)
        assert c.prm["last"] == pytest.approx(c.step_rewards[-1], abs=1e-6)
        assert c.prm["sum"] == pytest.approx(c.reward, abs=1e-5) == pytest.approx(sum(c.rewards), abs=1e-5)
    assert json.loads(json.dumps(rep.to_dict()))["completions"][0]["prm"] == multi.prm

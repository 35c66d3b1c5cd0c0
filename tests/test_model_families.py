"""The architectures people train, as tiny random configs: for each, prefix-shared log-probs equal the plain layout's,
two DPO steps run, credit runs, and beam search matches transformers' generate token for token."""

import pytest
import torch
from conftest import EOS, PAD, hf_beams, pref_rows, train_cfg, write_jsonl
from transformers import GenerationConfig

from r2q.credit import score_pairs
from r2q.data import preference_examples_from_rows
from r2q.search.beam import beam_search
from r2q.search.lm import Lockstep
from r2q.tokens import completion_logps, examples_batch, shared_layout
from r2q.toy import ARCHITECTURES, tiny_model
from r2q.train import train

ARCHS = list(ARCHITECTURES)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("arch") / "pairs.jsonl", pref_rows(16, 7))


def model_of(arch, tokenizer, seed=0):
    return tiny_model(arch, len(tokenizer), seed=seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, tokenizer, pairs, tmp_path):
    model = model_of(arch, tokenizer)
    ex, _ = preference_examples_from_rows(pref_rows(6, 8), tokenizer)
    with torch.no_grad():
        shared = completion_logps(model, examples_batch(ex, tokenizer.pad_token_id, share_prefix=True))
        plain = completion_logps(model, examples_batch(ex, tokenizer.pad_token_id, share_prefix=False))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)

    res = train(train_cfg("", pairs, tmp_path / "run", max_steps=2, batch_size=4), model=model_of(arch, tokenizer),
                tokenizer=tokenizer)
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in res.metrics)

    rep = score_pairs(res.model.eval(), model_of(arch, tokenizer), tokenizer, pref_rows(3, 9), 0.1, use_cache=False)
    assert len(rep.pairs) == 3 and all(torch.isfinite(torch.tensor(p.chosen.rewards)).all() for p in rep.pairs)

    m = model_of(arch, tokenizer, seed=1).eval()
    with torch.no_grad():  # peaky, so that beams rarely tie
        m.get_output_embeddings().weight.mul_(20.0)
    m.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    prompts = [tokenizer(t).input_ids for t in ("the film was", "a", "12+30= and")]
    with torch.no_grad():
        hf = hf_beams(m, prompts, 3, 0.0, False, max_new=8)
        ours = beam_search(Lockstep([m]), prompts, PAD, [EOS], 3, 8, lambda l: l[0], num_return=3)
    assert [[h.token_ids for h in o] for o in ours] == hf


def test_a_model_that_cannot_take_the_shared_mask_falls_back_to_the_plain_layout(tokenizer, pairs, tmp_path, capsys):
    """Flash attention takes padding masks only: r2q says so in one line and runs pairs unshared, with the same
    losses as --no-share-prefix."""
    flash = model_of("llama", tokenizer)
    flash.config._attn_implementation = "flash_attention_2"
    assert shared_layout(True, flash) is False and shared_layout(True, model_of("llama", tokenizer)) is True
    said = []
    assert shared_layout(True, flash, say=said.append) is False and len(said) == 1
    assert "flash_attention_2" in said[0] and "\n" not in said[0]
    import r2q.train.loop as t

    real = t.shared_layout
    t.shared_layout = lambda share, *ms, say=None: real(share, flash, say=say)  # the trainer sees a flash model
    try:
        fell = train(train_cfg("", pairs, tmp_path / "fell", max_steps=2, batch_size=4),
                     model=model_of("llama", tokenizer), tokenizer=tokenizer)
    finally:
        t.shared_layout = real
    assert "pairs run in the plain layout" in capsys.readouterr().err
    plain = train(train_cfg("", pairs, tmp_path / "plain", max_steps=2, batch_size=4, share_prefix=False),
                  model=model_of("llama", tokenizer), tokenizer=tokenizer)
    assert [m["loss"] for m in fell.metrics] == pytest.approx([m["loss"] for m in plain.metrics], abs=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
def test_shared_mask_for_each_attention_implementation(impl, tokenizer):
    """The prefix-shared mask goes to eager attention additive, to sdpa as booleans and to FlexAttention as a
    BlockMask; each gives eager attention's plain-layout log-probs (fp32, 1e-5), in either order of layouts.
    FlexAttention runs uncompiled on the CPU: transformers' compiled flex_attention gave values 0.36 off here
    (`eager_flex`)."""
    ex, _ = preference_examples_from_rows(pref_rows(6, 8), tokenizer)
    with torch.no_grad():
        truth = completion_logps(model_of("llama", tokenizer), examples_batch(ex, tokenizer.pad_token_id))
        model = model_of("llama", tokenizer)
        model.set_attn_implementation(impl)
        for share in (True, False, True):
            got = completion_logps(model, examples_batch(ex, tokenizer.pad_token_id, share_prefix=share))
            torch.testing.assert_close(got, truth, atol=1e-5, rtol=1e-5)


def test_flex_attention_on_the_cpu(tokenizer, pairs, tmp_path):
    """Uncompiled on the CPU: beam search with FlexAttention gives sdpa's beams, with no warning about the
    unfused kernel; training with it is one line (no FlexAttention backward on the CPU), before any step."""
    import warnings

    from r2q.errors import UserError
    from r2q.tokens import eager_flex

    m = model_of("llama", tokenizer, seed=1).eval()
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(20.0)
    prompts = [tokenizer(t).input_ids for t in ("the film was", "a", "12+30= and")]
    with torch.no_grad():
        want = beam_search(Lockstep([m]), prompts, PAD, [EOS], 3, 8, lambda l: l[0], num_return=3)
        m.set_attn_implementation("flex_attention")
        assert eager_flex(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = beam_search(Lockstep([m]), prompts, PAD, [EOS], 3, 8, lambda l: l[0], num_return=3)
    assert [[h.token_ids for h in o] for o in got] == [[h.token_ids for h in o] for o in want]
    for o, w in zip(got, want):
        assert [h.logp for h in o] == pytest.approx([h.logp for h in w], abs=1e-4)
    flex = model_of("llama", tokenizer)
    flex.set_attn_implementation("flex_attention")
    with pytest.raises(UserError, match="flex_attention, which has no backward on the CPU"):
        train(train_cfg("", pairs, tmp_path / "run", max_steps=1, batch_size=4), model=flex, tokenizer=tokenizer)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_packed_pairs_give_the_plain_log_probs(tokenizer, pairs, tmp_path):
    """Several prefix-shared pairs in one row attend within their own block only: log-probs equal the plain
    layout's, in fewer rows; training with --pack gives the unpacked run's losses."""
    import random

    from r2q.tokens import build_pair_batch

    rng = random.Random(0)
    toks = [rng.randrange(2, 300) for _ in range(400)]

    def seq(n):
        i = rng.randrange(0, 300)
        return toks[i : i + n]

    P = [seq(rng.randint(1, 30)) for _ in range(9)]
    C = [seq(rng.randint(1, 20)) for _ in range(9)]
    R = [seq(rng.randint(1, 20)) for _ in range(9)]
    model = model_of("llama", tokenizer)
    packed = build_pair_batch(P, C, R, 0, share_prefix=True, pack_to=80)
    assert packed.input_ids.shape[0] < 9 and packed.num_tokens == sum(len(p) + len(c) + len(r)
                                                                       for p, c, r in zip(P, C, R))
    with torch.no_grad():
        plain = completion_logps(model, build_pair_batch(P, C, R, 0))
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            torch.testing.assert_close(completion_logps(model, packed), plain, atol=1e-5, rtol=1e-5)
    a = train(train_cfg("", pairs, tmp_path / "a", max_steps=2, batch_size=8), model=model_of("llama", tokenizer),
              tokenizer=tokenizer)
    b = train(train_cfg("", pairs, tmp_path / "b", max_steps=2, batch_size=8, pack=64),
              model=model_of("llama", tokenizer), tokenizer=tokenizer)
    assert [m["loss"] for m in a.metrics] == pytest.approx([m["loss"] for m in b.metrics], abs=1e-5)

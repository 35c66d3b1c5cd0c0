"""What training at scale needs, on tiny models: dropout off in DPO, gradient checkpointing."""

import pytest
import torch
from test_train import cfg, pref_rows, write_jsonl
from transformers import GPT2Config, GPT2LMHeadModel

from r2q.data import preference_examples_from_rows
from r2q.errors import UserError
from r2q.models import disable_dropout, tiny_model
from r2q.tokens import TokenScorer, examples_batch
from r2q.train import train


def dropout_gpt2(vocab: int, p: float = 0.3):
    torch.manual_seed(0)
    c = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=p, embd_pdrop=p,
                   attn_pdrop=p)
    return GPT2LMHeadModel(c)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("scale") / "pairs.jsonl", pref_rows(32, 3))


def test_dpo_turns_dropout_off_unless_kept(pairs, tokenizer, tmp_path):
    """The first step's policy is the reference (ref init): without dropout its implicit rewards are exactly 0,
    with the model's dropout on they are noise."""
    off = train(cfg("", pairs, tmp_path / "off", max_steps=1), model=dropout_gpt2(len(tokenizer)),
                tokenizer=tokenizer)
    assert off.metrics[0]["rewards/chosen"] == 0.0 and off.metrics[0]["rewards/rejected"] == 0.0
    kept = train(cfg("", pairs, tmp_path / "kept", max_steps=1, keep_dropout=True),
                 model=dropout_gpt2(len(tokenizer)), tokenizer=tokenizer)
    assert abs(kept.metrics[0]["rewards/chosen"]) > 1e-4
    m = dropout_gpt2(len(tokenizer))
    disable_dropout(m)
    assert all(d.p == 0.0 for d in m.modules() if isinstance(d, torch.nn.Dropout))
    with pytest.raises(UserError, match="--keep-dropout is a DPO option"):
        train(cfg("", pairs, tmp_path / "sft", max_steps=1, keep_dropout=True), "sft",
              model=dropout_gpt2(len(tokenizer)), tokenizer=tokenizer)


def _grads_and_saved_bytes(model, batch):
    """Gradients of the summed log-probs and the bytes autograd saves for the backward pass."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = TokenScorer(model)(batch.input_ids, batch.attention_mask, batch.position_ids, batch.src_index,
                                  batch.targets)
    logp.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients_with_less_saved(arch, tokenizer):
    ex, _ = preference_examples_from_rows(pref_rows(8, 4), tokenizer)
    b = examples_batch(ex, tokenizer.pad_token_id)
    model = tiny_model(arch, len(tokenizer), seed=5, layers=4).train()
    disable_dropout(model)
    plain, plain_bytes = _grads_and_saved_bytes(model, b)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, ckpt_bytes = _grads_and_saved_bytes(model, b)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-5)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_train_with_gradient_checkpointing_matches_plain(pairs, llama_dir, tmp_path):
    plain = train(cfg(llama_dir, pairs, tmp_path / "plain", max_steps=2))
    ckpt = train(cfg(llama_dir, pairs, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True))
    for a, b in zip(plain.model.state_dict().values(), ckpt.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ckpt.model.is_gradient_checkpointing

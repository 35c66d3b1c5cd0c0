"""What training at scale needs, on tiny models: dropout off in DPO, gradient checkpointing."""

import pytest
import torch
from conftest import pref_rows, train_cfg, write_jsonl
from transformers import GPT2Config, GPT2LMHeadModel

from r2q.data import preference_examples_from_rows
from r2q.errors import UserError
from r2q.models import disable_dropout
from r2q.tokens import TokenScorer, examples_batch
from r2q.toy import tiny_model
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
    off = train(train_cfg("", pairs, tmp_path / "off", max_steps=1), model=dropout_gpt2(len(tokenizer)),
                tokenizer=tokenizer)
    assert off.metrics[0]["rewards/chosen"] == 0.0 and off.metrics[0]["rewards/rejected"] == 0.0
    kept = train(train_cfg("", pairs, tmp_path / "kept", max_steps=1, keep_dropout=True),
                 model=dropout_gpt2(len(tokenizer)), tokenizer=tokenizer)
    assert abs(kept.metrics[0]["rewards/chosen"]) > 1e-4
    m = dropout_gpt2(len(tokenizer))
    disable_dropout(m)
    assert all(d.p == 0.0 for d in m.modules() if isinstance(d, torch.nn.Dropout))
    with pytest.raises(UserError, match="--keep-dropout is a DPO option"):
        train(train_cfg("", pairs, tmp_path / "sft", max_steps=1, keep_dropout=True), "sft",
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
    from r2q.models import quiet_deprecations

    with quiet_deprecations():  # the trainer's call, as the trainer makes it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, ckpt_bytes = _grads_and_saved_bytes(model, b)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-5)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_train_with_gradient_checkpointing_matches_plain(pairs, llama_dir, tmp_path):
    plain = train(train_cfg(llama_dir, pairs, tmp_path / "plain", max_steps=2))
    ckpt = train(train_cfg(llama_dir, pairs, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True))
    for a, b in zip(plain.model.state_dict().values(), ckpt.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert getattr(ckpt.model, "is_activation_checkpointing", None) or ckpt.model.is_gradient_checkpointing


def test_lora_reference_is_the_model_with_adapters_off(pairs, llama_dir, tmp_path):
    """LoRA DPO with the adapters-disabled reference trains exactly as with an explicit frozen copy of the base, live
    or precomputed; only the adapters train."""
    from r2q.models import load_model

    lora = dict(max_steps=3, lora_r=4, lora_alpha=8.0)
    base = train(train_cfg(llama_dir, pairs, tmp_path / "off", **lora))
    explicit = train(train_cfg(llama_dir, pairs, tmp_path / "copy", ref=str(llama_dir), **lora))
    cached = train(train_cfg(llama_dir, pairs, tmp_path / "pre", precompute_ref=True, **lora))
    for a, b, c in zip(base.metrics, explicit.metrics, cached.metrics):
        for k in ("loss", "rewards/chosen", "rewards/rejected"):
            assert a[k] == pytest.approx(b[k], abs=1e-6) and a[k] == pytest.approx(c[k], abs=1e-6), k
    assert base.metrics[-1]["rewards/margins"] != 0.0  # the adapters learned something
    start = load_model(llama_dir).state_dict()
    merged = base.model.merge_and_unload().state_dict()
    assert any(not torch.equal(start[k], merged[k]) for k in start)
    trainable = [n for n, p in explicit.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_adapter_round_trips_and_merges_to_the_same_log_probs(pairs, llama_dir, tmp_path, tokenizer):
    from r2q.models import load_model
    from r2q.tokens import completion_logps

    res = train(train_cfg(llama_dir, pairs, tmp_path / "a", max_steps=2, lora_r=4, lr=1e-2, save_every=1))
    out = tmp_path / "a"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter only, in PEFT's format
    ex, _ = preference_examples_from_rows(pref_rows(6, 9), tokenizer)
    b = examples_batch(ex, tokenizer.pad_token_id)
    with torch.no_grad():
        live = completion_logps(res.model.eval(), b)
        loaded = completion_logps(load_model(out).eval(), b)  # base + adapter, merged on load
        base = completion_logps(load_model(llama_dir).eval(), b)
    torch.testing.assert_close(loaded, live, atol=1e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-3
    # credit and generate take the adapter directory as --model; credit's reference is its base
    from r2q.cli import run_credit
    from r2q.credit import CreditConfig
    from r2q.search import GenerateConfig, generate

    rep = run_credit(CreditConfig(model=str(out), prompt="the film", response=" was good", quiet=True, show=0))
    assert rep["meta"]["ref"] == str(llama_dir.resolve())
    gens, _ = generate(load_model(out), tokenizer, ["the film"], GenerateConfig(method="greedy", max_new_tokens=4))
    assert gens[0].num_tokens > 0
    merged = train(train_cfg(llama_dir, pairs, tmp_path / "m", max_steps=2, lora_r=4, lr=1e-2, merge=True))
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "adapter" / "adapter_config.json"
                                                                 ).is_file()
    with torch.no_grad():
        full = completion_logps(load_model(tmp_path / "m").eval(), b)
        adapter = completion_logps(load_model(tmp_path / "m" / "adapter").eval(), b)
        returned = completion_logps(merged.model.eval(), b)
    torch.testing.assert_close(full, adapter, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, returned, atol=1e-5, rtol=1e-5)
    # a run resumed from an adapter checkpoint ends with the uninterrupted run's adapter
    kw = dict(lora_r=4, lr=1e-2, save_every=1, schedule="constant")
    whole = train(train_cfg(llama_dir, pairs, tmp_path / "whole", max_steps=3, **kw))
    train(train_cfg(llama_dir, pairs, tmp_path / "part", max_steps=1, **kw))
    resumed = train(train_cfg(llama_dir, pairs, tmp_path / "part", max_steps=3, resume=True, **kw))
    assert resumed.steps == 3
    for (n, a), (_, c) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        if "lora_" in n:
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_lora_options_need_lora_r(pairs, llama_dir, tmp_path):
    with pytest.raises(UserError, match="--lora-alpha is a LoRA option"):
        train(train_cfg(llama_dir, pairs, tmp_path / "x", lora_alpha=4.0))
    with pytest.raises(UserError, match="--lora-target-modules: 'nope' matches no module"):
        train(train_cfg(llama_dir, pairs, tmp_path / "y", lora_r=2, lora_target_modules="nope", max_steps=1))
    with pytest.raises(UserError, match="add --keep-dropout"):
        train(train_cfg(llama_dir, pairs, tmp_path / "z", lora_r=2, lora_dropout=0.1))


def hub_repo(root, splits):
    """A data set repository laid out as on the hub: a README whose YAML names two configurations, and parquet
    shards under data/ (TRL's implicit-prompt conversational preference format, as trl-lib/* data sets use)."""
    import datasets

    for config, rows_by_split in splits.items():
        for split, rows in rows_by_split.items():
            d = root / config
            d.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(d / f"{split}-00000-of-00001.parquet"))
    yaml = "---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}-*.parquet\n" for s in ss)
        for c, ss in splits.items()) + "---\n# a test data set\n"
    (root / "README.md").write_text(yaml)
    return root


def conversational(rows):
    return [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
            for r in rows]


def test_hub_data_sets_by_name_and_layout(llama_dir, tmp_path, monkeypatch, tokenizer):
    """--data takes a data set repository laid out as on the hub (offline), with --split/--eval-split and
    --subset; an ORG/NAME that is neither a local path nor reachable is one line."""
    from r2q.data import load_preferences

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = hub_repo(tmp_path / "trl-lib" / "prefs", {
        "default": {"train": conversational(pref_rows(24, 1)), "test": conversational(pref_rows(8, 2))},
        "small": {"train": conversational(pref_rows(6, 3))}})
    ex, rep = load_preferences(repo, tokenizer)
    assert len(ex) == 24 and rep.formats == {"implicit-prompt": 24}
    assert len(load_preferences(repo, tokenizer, split="test")[0]) == 8
    assert len(load_preferences(repo, tokenizer, subset="small")[0]) == 6
    monkeypatch.chdir(tmp_path)  # ORG/NAME resolving to a local repository directory
    res = train(train_cfg(llama_dir, "trl-lib/prefs", tmp_path / "run", max_steps=2, batch_size=4,
                    eval_data="trl-lib/prefs"))
    assert res.steps == 2 and res.metrics[-1]["split"] == "eval"
    with pytest.raises(UserError, match="no-such-org/no-such-set: cannot load this data set"):
        load_preferences("no-such-org/no-such-set", tokenizer)
    with pytest.raises(UserError, match="validation"):
        load_preferences(repo, tokenizer, split="validation")


def test_bf16_weights_train_in_bf16(pairs, llama_dir, tmp_path):
    from safetensors.torch import load_file

    res = train(train_cfg(llama_dir, pairs, tmp_path / "bf16", max_steps=2, dtype="bf16-weights"))
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in res.metrics)
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}

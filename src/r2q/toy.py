"""Toy models and tokenizers built from scratch, for tests, the demo, the theory checks and the benchmarks: a
byte-level BPE tokenizer trained on a few texts, and small randomly initialised causal LMs of the architectures
r2q is tested on. Nothing here loads a real model (that is r2q.models)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import UserError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n<|assistant|>{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, eos: str = "<|endoftext|>",
                        chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer (pad = EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [eos] + ([f"<|{r}|>" for r in ("system", "user", "assistant")] if chat_template else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos)
    if chat_template:
        fast.chat_template = chat_template
    return fast


# the architectures tested (tests/test_model_families.py): HF model_type -> config fields beyond the shared ones
ARCHITECTURES = {
    "llama": {}, "gpt2": {}, "gpt_neox": {}, "mistral": {"sliding_window": 64}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 64}, "gemma3_text": {"head_dim": 16, "sliding_window": 64},
    "phi3": {}, "opt": {},
}


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512):
    """Config of a small causal LM of one of ARCHITECTURES (random weights come from `tiny_model`)."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    ids = dict(vocab_size=vocab_size, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0,
               pad_token_id=0, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden)
    if arch == "opt":
        return AutoConfig.for_model("opt", ffn_dim=hidden * 2, word_embed_proj_dim=hidden, **ids)
    kv = {} if arch == "gpt_neox" else {"num_key_value_heads": max(1, heads // 2)}
    return AutoConfig.for_model(arch, intermediate_size=hidden * 2, **kv, **ids, **ARCHITECTURES[arch])


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **kw):
    """A randomly initialised causal LM from `tiny_config` (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **kw))
    return model.float().eval()


def save_model(model, tokenizer, out: str | os.PathLike) -> Path:
    """`model` (and `tokenizer`, unless None) saved to `out` as an HF checkpoint with safetensors weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out

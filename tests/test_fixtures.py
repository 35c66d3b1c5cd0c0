import torch


def test_tiny_models_are_real_and_small(model, tokenizer):
    n = sum(p.numel() for p in model.parameters())
    assert 5e4 < n < 1e6, n
    ids = tokenizer("12+30=42", return_tensors="pt").input_ids
    out = model(ids).logits
    assert out.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out).all()


def test_tokenizer_roundtrip(tokenizer):
    text = "17+25=42\nthe movie was great."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None

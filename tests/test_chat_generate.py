"""Chat prompts in generate: a list of messages is rendered with the tokenizer's chat template and its generation
prompt, encoded exactly as training encodes a conversation's prompt, and decoded like any other prompt."""

import copy

import pytest
from conftest import sharp_model

from r2q.data import preference_examples_from_rows
from r2q.errors import UserError
from r2q.search import GenerateConfig, encode_prompts, generate

CHAT = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "the film was"}]


def test_a_chat_prompt_is_the_template_with_its_generation_prompt(tokenizer):
    (ids,) = encode_prompts(tokenizer, [CHAT])
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text != tokenizer.apply_chat_template(CHAT, tokenize=False)  # the assistant's turn is opened
    assert ids == tokenizer(text).input_ids
    # the ids a policy trained on this conversation saw before its reply
    (ex,), _ = preference_examples_from_rows([{"prompt": CHAT, "chosen": [{"role": "assistant", "content": "good"}],
                                               "rejected": [{"role": "assistant", "content": "bad"}]}], tokenizer)
    assert ids == ex.prompt_ids


def test_generate_decodes_chat_prompts_as_their_rendered_text(tokenizer):
    pol = sharp_model("llama", seed=3, vocab=len(tokenizer))
    cfg = GenerateConfig(method="beam", num_beams=2, max_new_tokens=5)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat, _ = generate(pol, tokenizer, [CHAT, "a plain prompt"], cfg)
    plain, _ = generate(pol, tokenizer, [text, "a plain prompt"], cfg)
    assert [h.token_ids for h in chat] == [h.token_ids for h in plain]
    assert chat[0].prompt == CHAT and chat[0].as_dict()["prompt"] == CHAT  # the line keeps the prompt as given


def test_bad_chat_prompts_are_one_line(tokenizer):
    with pytest.raises(UserError, match="prompt 2: field 'prompt' message 1 has no 'content'"):
        encode_prompts(tokenizer, ["fine", [{"role": "user"}]])
    with pytest.raises(UserError, match="prompt 1: field 'prompt' has no messages"):
        encode_prompts(tokenizer, [[]])
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="prompt 1: the prompt is a list of messages but the tokenizer has no chat"):
        encode_prompts(bare, [CHAT])

"""Shared fixtures: tiny real HF causal LMs and a BPE tokenizer trained on the fly. No downloads."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = ("the a movie film was great terrible plot acting good bad boring loved hated story actor scene "
         "really very not quite fun dull music ending long short best worst").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".")
    return lines


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from r2q.models import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(corpus(), vocab_size=320).save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).vocab_size <= 320
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from r2q.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _saved_model(tmp_path_factory, tokenizer, arch, seed):
    from r2q.models import save_model, tiny_model

    d = tmp_path_factory.mktemp(f"{arch}{seed}")
    save_model(tiny_model(arch, len(tokenizer), seed=seed), tokenizer, d)
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return _saved_model(tmp_path_factory, tokenizer, "llama", 0)


@pytest.fixture(scope="session")
def llama_ref_dir(tmp_path_factory, tokenizer):
    return _saved_model(tmp_path_factory, tokenizer, "llama", 1)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    return _saved_model(tmp_path_factory, tokenizer, "gpt2", 0)


@pytest.fixture(params=["llama", "gpt2"])
def model(request, llama_dir, gpt2_dir):
    from r2q.models import load_model

    return load_model(llama_dir if request.param == "llama" else gpt2_dir).eval()

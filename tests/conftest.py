"""Shared fixtures: tiny real HF causal LMs and a BPE tokenizer trained on the fly. No downloads."""

import json
import os
import random
from pathlib import Path

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

    from r2q.toy import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(corpus(), vocab_size=320).save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).vocab_size <= 320
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from r2q.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _saved_model(tmp_path_factory, tokenizer, arch, seed):
    from r2q.toy import save_model, tiny_model

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


# ------------------------------------------------------------------ helpers shared by the test modules


def pref_rows(n, seed):
    """Pairs whose preference is decided by one word: the chosen ends with 'good', the rejected with 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": prompt, "chosen": f" {body} good.", "rejected": f" {body} bad."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cfg(model_dir, data, out, **kw):
    """A TrainConfig for the tiny models: quiet, lr 2e-3, batch 8, the reference cache beside `out`."""
    from r2q.train import TrainConfig

    base = dict(model=str(model_dir), data=str(data), out=str(out), lr=2e-3, batch_size=8, quiet=True,
                cache_dir=str(Path(out).parent / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def ckpt_cfg(model, data, out, **kw):
    """train_cfg for resume tests: 4 steps, a checkpoint after each, all kept."""
    return train_cfg(model, data, out, **dict(dict(max_steps=4, save_every=1, keep_last=4), **kw))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """r2q in this process: (exit code, stdout, stderr)."""
    from r2q.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


V, PAD, EOS = 40, 0, 1


def sharp_model(arch, seed, vocab=V, scale=6.0, eos_bias=1.5):
    """A random tiny LM made peaky (so beams rarely tie) and fond of EOS (so hypotheses finish)."""
    from transformers import GenerationConfig

    from r2q.toy import tiny_model

    m = tiny_model(arch, vocab, seed=seed)
    head = m.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(scale)
        if arch == "llama":
            m.model.norm.weight.fill_(1.0)
        head.weight[EOS] += eos_bias * head.weight.abs().mean() * torch.sign(head.weight.sum(0))
    m.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return m.eval()


def prompts_of(n, seed, vocab=V):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 8))] for _ in range(n)]


def hf_beams(model, prompts, K, lp, es, max_new):
    """transformers' beam search: the K returned hypotheses per prompt, cut after EOS."""
    from transformers import GenerationConfig

    from r2q.search.lm import left_pad

    ids, mask = left_pad(prompts, PAD)
    gc = GenerationConfig(num_beams=K, do_sample=False, length_penalty=lp, early_stopping=es, max_new_tokens=max_new,
                          num_return_sequences=K, pad_token_id=PAD, eos_token_id=EOS)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    res = []
    for b in range(len(prompts)):
        rows = []
        for k in range(K):
            row = out[b * K + k, ids.shape[1]:].tolist()
            rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
        res.append(rows)
    return res

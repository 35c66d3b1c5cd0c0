"""Shared fixtures: tiny real HF causal LMs and a BPE tokenizer trained on the fly. No downloads."""

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
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


# launching r2q in several processes (test_distributed, test_shards)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", MASTER_ADDR="127.0.0.1",
                HF_HOME=str(tmp_path / "hf"),  # no user accelerate config (default_config.yaml) leaks in
                TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "r2q.cli"]


def accelerate_launch(n: int) -> list[str]:
    # --multi_gpu picks torch's launcher (n processes); with ACCELERATE_USE_CPU=1 they join a gloo group.
    # (`--cpu --num_processes n` would start one process: the CPU path spawns several only through mpirun.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "r2q.cli"]


def single() -> list[str]:
    return [sys.executable, "-m", "r2q.cli"]


def run(launcher: list[str], args: list[str], tmp_path, timeout: float = 120) -> None:
    """Run an r2q command under `launcher` to the end; a hang (one rank waiting in a collective the others never
    join) fails instead of blocking."""
    log = tmp_path / f"log-{len(list(tmp_path.glob('log-*')))}.txt"  # a file, not a pipe: a stray worker can't block
    with open(log, "w") as f:
        p = subprocess.Popen(launcher + args, env=env_for(tmp_path), stdout=f, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own, so kill the launcher's tree by pid
            root = psutil.Process(p.pid)
            for q in [*root.children(recursive=True), root]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    q.kill()
            p.wait()
            pytest.fail(f"{' '.join(launcher[1:4])} ... hung for {timeout} s:\n{log.read_text()[-3000:]}")
    out = log.read_text()
    # the launcher's summary comes last; the worker's error line is what says why
    why = ("Error", "Exception", "what()", "terminate", "Abort", "Signal")
    errors = "\n".join(dict.fromkeys(ln for ln in out.splitlines()
                                      if any(w in ln for w in why) and "elastic" not in ln))
    assert p.returncode == 0, f"{errors[-3000:]}\n...\n{out[-2000:]}"


# search
def enumerate_best(pol, ref, prompt, vocab, max_len, beta, ref_term=True):
    """Exhaustive argmax over every sequence of the tiny vocabulary (EOS ends one; max_len cuts one) of the
    summed implicit reward beta log pi/pi_ref, plus beta log pi_ref when ref_term (= beta log pi)."""
    import itertools

    from r2q.search import score_sequences

    seqs = []
    body_tokens = [a for a in range(vocab) if a != EOS]
    for n in range(1, max_len + 1):
        for body in itertools.product(body_tokens, repeat=n - 1):
            seqs.append(list(body) + [EOS])
            if n == max_len:
                seqs += [list(body) + [a] for a in body_tokens]
    logp, reward = score_sequences(pol, ref, [prompt] * len(seqs), seqs, PAD, beta)
    value = [beta * lp for lp in logp] if ref_term else reward
    i = max(range(len(seqs)), key=lambda j: value[j])
    return seqs[i], value[i], seqs

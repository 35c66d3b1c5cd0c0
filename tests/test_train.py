"""The trainer: learning, the reference choices, the reference cache, resume after a kill, NaN stop, bad data."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import pref_rows, train_cfg, write_jsonl
from safetensors.torch import load_file

from r2q.errors import UserError
from r2q.models import load_model
from r2q.train import train


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    return write_jsonl(d / "train.jsonl", pref_rows(96, 0)), write_jsonl(d / "eval.jsonl", pref_rows(32, 1))


def test_dpo_raises_heldout_margin_and_accuracy(llama_dir, pref_files, tmp_path):
    train_f, eval_f = pref_files
    res = train(train_cfg(llama_dir, train_f, tmp_path / "run", eval_data=str(eval_f), max_steps=24, eval_every=24,
                    warmup_steps=2))
    evals = [m for m in res.metrics if m["split"] == "eval"]
    assert len(evals) == 1
    # at step 0 the policy is its reference: every implicit reward is 0 and accuracy is 0
    assert evals[-1]["rewards/margins"] > 0.5
    assert evals[-1]["rewards/accuracies"] >= 0.9
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["split"] == "train"] == list(range(1, 25))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen_token_mean", "kl/ref_pi_est",
                "kl/pi_ref_est", "grad_norm", "learning_rate", "tokens_per_s"):
        assert key in lines[0]
    assert lines[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start
    # the saved model is the trained one: same logits, bit for bit
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    torch.testing.assert_close(load_model(tmp_path / "run")(ids).logits, res.model.eval()(ids).logits, rtol=0, atol=0)


def test_eval_on_start_logs_step_0_where_policy_is_reference(llama_dir, pref_files, tmp_path):
    train_f, eval_f = pref_files
    c = train_cfg(llama_dir, train_f, tmp_path / "a", eval_data=str(eval_f), max_steps=2, save_every=2,
            eval_on_start=True)
    res = train(c)
    (start,) = [m for m in res.metrics if m["split"] == "eval" and m["step"] == 0]
    assert res.metrics[0] is start  # logged before the first step
    # ref=init: at step 0 the policy is the reference, so every implicit reward is 0 and the loss is log 2
    assert start["rewards/margins"] == 0.0 and start["rewards/chosen"] == 0.0
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # resuming the finished run evaluates at its end only; the step-0 row stays in the file once
    c.resume = True
    assert [m["step"] for m in train(c).metrics] == [2]
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["split"] == "eval"].count(0) == 1
    res = train(train_cfg(llama_dir, train_f, tmp_path / "b", eval_data=str(eval_f), max_steps=2))
    assert [m["step"] for m in res.metrics if m["split"] == "eval"] == [2]


def test_ref_init_for_in_memory_model_and_ref_none(llama_dir, pref_files, tmp_path, tokenizer):
    train_f, _ = pref_files
    model = load_model(llama_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(train_cfg("", train_f, tmp_path / "a", max_steps=3), model=model, tokenizer=tokenizer)
    assert res.metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # reference = the starting weights
    assert any(not torch.equal(start[k], v) for k, v in res.model.state_dict().items())
    res = train(train_cfg(llama_dir, train_f, tmp_path / "b", max_steps=1, ref="none"))
    # reference-free: the reward is beta * log pi, negative for any real distribution
    assert res.metrics[0]["rewards/chosen"] < 0


def test_reference_cache_is_reused(llama_dir, llama_ref_dir, pref_files, tmp_path, monkeypatch):
    import r2q.reference as rf
    from r2q.train import Trainer

    train_f, _ = pref_files
    calls = []
    real = rf.score_reference
    monkeypatch.setattr(rf, "score_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = train_cfg(llama_dir, train_f, tmp_path / "a", max_steps=2, ref=str(llama_ref_dir), precompute_ref=True)
    first = Trainer(c, "dpo")
    assert len(calls) == 1 and first.refs["train"].kind == "cache" and first.refs["train"].model is None
    assert first.ref_cache_hits == 0
    m1 = first.run().metrics
    second = Trainer(dataclasses.replace(c, overwrite=True), "dpo")
    assert len(calls) == 1 and second.ref_cache_hits == 1  # no reference forward the second time
    # the cached and the live reference give the same numbers
    live = train(train_cfg(llama_dir, train_f, tmp_path / "b", max_steps=2, ref=str(llama_ref_dir)))
    for a, b in zip(m1, live.metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], rel=1e-4, abs=1e-6)


def test_sft_lowers_nll(llama_dir, pref_files, tmp_path):
    train_f, _ = pref_files
    res = train(train_cfg(llama_dir, train_f, tmp_path / "sft", max_steps=15, lr=3e-3), mode="sft")
    losses = [m["loss"] for m in res.metrics if m["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5


def test_nan_loss_stops_and_keeps_last_checkpoint(llama_dir, pref_files, tmp_path, monkeypatch):
    import r2q.train.loop as tr

    train_f, _ = pref_files
    real = tr.pair_stats
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        losses, stats = real(*a, **k)
        if len(calls) == 4:
            return losses * float("nan"), {k: v * float("nan") for k, v in stats.items()}
        return losses, stats

    monkeypatch.setattr(tr, "pair_stats", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="non-finite loss at step 4.*step-0000002"):
        train(train_cfg(llama_dir, train_f, out, max_steps=6, save_every=2))
    ck = out / "checkpoints" / "step-0000002"
    assert (ck / "trainer_state.json").exists()
    assert all(torch.isfinite(t).all() for t in load_file(ck / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()


def test_bad_data_is_one_line_error(llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    r = subprocess.run([sys.executable, "-m", "r2q.cli", "train", "--model", str(llama_dir), "--data", str(bad),
                        "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "rejected" in r.stderr and "line 2" in r.stderr
    assert "Traceback" not in r.stderr


RESUME_ARGS = ["--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--save-every", "1", "--keep-last", "3",
               "--quiet", "--seed", "3"]


def _train_cmd(model_dir, data, out, cache):
    return [sys.executable, "-m", "r2q.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--cache-dir", str(cache), *RESUME_ARGS]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(gpt2_dir, pref_files, tmp_path):
    """GPT-2 has dropout, so this also checks that the RNG state is restored."""
    train_f, _ = pref_files
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_train_cmd(gpt2_dir, train_f, full, tmp_path / "c"), check=True, env=env)
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(gpt2_dir, train_f, killed, tmp_path / "c"), env=env)
    ck = killed / "checkpoints"
    while p.poll() is None and len(list(ck.glob("step-*"))) < 2:  # kill mid-run, after a few checkpoints
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = sorted(ck.glob("step-*"))
    assert done and not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    subprocess.run(_train_cmd(gpt2_dir, train_f, killed, tmp_path / "c") + ["--resume"], check=True, env=env)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))

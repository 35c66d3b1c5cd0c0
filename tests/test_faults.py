"""Fault injection: nothing lost and nothing silently wrong when runs collide on one directory, an --overwrite is
killed, a reference changes under --resume, a link is planted under --out, or the disk fills. Each test names the
case of issue 20 it covers (A-F, the tracebacks, and the leftovers)."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ckpt_cfg, one_line_error, pref_rows, run_cli, write_jsonl
from safetensors.torch import load_file

from r2q.errors import UserError
from r2q.toy import save_model, tiny_model
from r2q.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("faults") / "train.jsonl", pref_rows(32, 0))


def _model(tmp_path, tokenizer, name, seed):
    return save_model(tiny_model("llama", len(tokenizer), seed=seed), tokenizer, tmp_path / name)


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def _cmd(model, data, out, *extra):
    return [sys.executable, "-m", "r2q.cli", "train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--cache-dir", str(Path(out).parent / "cache"), "--max-steps", "6", "--batch-size", "4", "--lr", "1e-3",
            "--save-every", "1", "--keep-last", "2", "--quiet", "--seed", "3", *map(str, extra)]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------- A: identity


@pytest.mark.parametrize("ref", ["path", "init"])
def test_resume_refuses_a_reference_whose_weights_changed(tokenizer, data, tmp_path, ref):
    """A: with --ref R, R's weights replaced between the run and --resume; with --ref init, the --model directory's.
    The resumed run would train against another reference: refused, naming the input that changed."""
    start, other = _model(tmp_path, tokenizer, "start", 0), _model(tmp_path, tokenizer, "ref", 1)
    c = ckpt_cfg(start, data, tmp_path / "run", ref=str(other) if ref == "path" else "init", max_steps=2)
    train(c)
    train(dataclasses.replace(c, resume=True, max_steps=3))  # unchanged inputs resume
    changed = other if ref == "path" else start
    save_model(tiny_model("llama", len(tokenizer), seed=7), tokenizer, changed)
    with pytest.raises(UserError, match="the reference --ref .* \\(its weights changed\\)" if ref == "path" else
                       "the starting model --model .*, the reference of --ref init \\(its weights changed\\)"):
        train(dataclasses.replace(c, resume=True, max_steps=4))
    rec = json.loads((tmp_path / "run" / "r2q_config.json").read_text())
    assert set(rec["inputs"]) == {"model", "reference", "tokenizer", "data"} and len(rec["inputs"]["reference"]) == 64


@pytest.mark.parametrize("what", ["tokenizer", "lora base"])
def test_resume_refuses_a_changed_tokenizer_or_lora_base(tokenizer, data, tmp_path, what):
    """1b, the other inputs a checkpoint fingerprints: the --model directory's tokenizer replaced by another of the
    same size (other merges), or, for a LoRA run, the base model's weights replaced: refused, naming it."""
    from conftest import corpus

    from r2q.models import load_tokenizer
    from r2q.toy import train_bpe_tokenizer

    start, ref = _model(tmp_path, tokenizer, "start", 0), _model(tmp_path, tokenizer, "ref", 1)
    lora = what == "lora base"  # the tokenizer case: --ref init, so no second tokenizer is compared first
    c = ckpt_cfg(start, data, tmp_path / "run", ref=str(ref) if lora else "init", max_steps=2, lora_r=4 if lora else 0)
    train(c)
    if what == "tokenizer":
        train_bpe_tokenizer(corpus(seed=3), vocab_size=320).save_pretrained(tmp_path / "tok2")
        other = load_tokenizer(tmp_path / "tok2")
        assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
        other.save_pretrained(start)
        match = "the tokenizer \\(its vocabulary differs\\)"
    else:
        save_model(tiny_model("llama", len(tokenizer), seed=7), tokenizer, start)
        match = "the base of the LoRA adapters \\(its weights changed\\)"
    with pytest.raises(UserError, match=match):
        train(dataclasses.replace(c, resume=True, max_steps=3))


def test_credit_and_generate_say_when_the_recorded_reference_changed(llama_dir, tokenizer, data, tmp_path, capsys):
    """A: `r2q credit --model D` (reference from the record) and `generate --ref R` say that R is not what D was
    trained against any more, and still run."""
    ref = _model(tmp_path, tokenizer, "ref", 1)
    train(ckpt_cfg(llama_dir, data, tmp_path / "run", ref=str(ref), max_steps=1, save_every=0))
    args = ("credit", "--model", tmp_path / "run", "--prompt", "a", "--response", "b", "--quiet")
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "has changed" not in err
    save_model(tiny_model("llama", len(tokenizer), seed=9), tokenizer, ref)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and f"the reference {ref} has changed since" in err
    (tmp_path / "p.txt").write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "run", "--ref", ref, "--prompts",
                           tmp_path / "p.txt", "--out", tmp_path / "g.jsonl", "--method", "greedy",
                           "--max-new-tokens", "3", "--quiet")
    assert code == 0 and f"the reference {ref} has changed since" in err


# ---------------------------------------------------------------------------------------------- B: overwrite


def test_killed_overwrite_never_pairs_old_weights_with_a_new_record(llama_dir, data, tmp_path, capsys):
    """B: a finished run in D, then `--overwrite` killed after its first checkpoint: D holds neither the old final
    weights nor any record, so `credit --model D` cannot score old weights under new settings."""
    out = tmp_path / "run"
    subprocess.run(_cmd(llama_dir, data, out, "--beta", "0.1"), check=True, env=ENV)
    assert (out / "model.safetensors").exists() and (out / "r2q_config.json").exists()
    p = subprocess.Popen(_cmd(llama_dir, data, out, "--beta", "0.5", "--overwrite"), env=ENV)
    first = out / "checkpoints" / "step-0000001"  # the old run kept steps 5 and 6
    while p.poll() is None and not first.exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "model.safetensors").exists() and not (out / "r2q_config.json").exists()
    code, _, err = run_cli(capsys, "credit", "--model", out, "--ref", llama_dir, "--prompt", "a", "--response", "b")
    assert "no such" in one_line_error(code, err) or "cannot load" in err
    # --resume picks the new run up where it was killed; its record is written with its final weights
    subprocess.run(_cmd(llama_dir, data, out, "--beta", "0.5", "--resume"), check=True, env=ENV)
    assert json.loads((out / "r2q_config.json").read_text())["beta"] == 0.5


# ---------------------------------------------------------------------------------------------- C: in place


def test_training_in_place_is_refused(llama_dir, tokenizer, data, tmp_path):
    """C: --out equal to --model or --ref, symlinks resolved, before anything is written."""
    start = _model(tmp_path, tokenizer, "start", 0)
    (tmp_path / "alias").symlink_to(start)
    before = {p.name: p.read_bytes() for p in start.iterdir()}
    for out in (start, tmp_path / "alias"):
        with pytest.raises(UserError, match="is the --model directory"):
            train(ckpt_cfg(start, data, out))
        with pytest.raises(UserError, match="is the --model directory"):
            train(ckpt_cfg(start, data, out, lora_r=4))
    with pytest.raises(UserError, match="is the --ref directory"):
        train(ckpt_cfg(llama_dir, data, tmp_path / "alias", ref=str(start)))
    assert {p.name: p.read_bytes() for p in start.iterdir()} == before


def test_a_lora_adapter_that_is_its_own_base_is_one_line(llama_dir, data, tmp_path, capsys):
    """C: an adapter whose base_model_name_or_path names its own directory (what training in place with LoRA
    made) fails with one line, not a RecursionError."""
    train(ckpt_cfg(llama_dir, data, tmp_path / "lora", lora_r=4, max_steps=1, save_every=0))
    conf = tmp_path / "lora" / "adapter_config.json"
    conf.write_text(json.dumps(dict(json.loads(conf.read_text()), base_model_name_or_path=str(tmp_path / "lora"))))
    code, _, err = run_cli(capsys, "credit", "--model", tmp_path / "lora", "--ref", llama_dir, "--prompt", "a",
                           "--response", "b")
    assert "base model is itself" in one_line_error(code, err)


# ---------------------------------------------------------------------------------------------- D: one run per dir


def test_two_runs_started_together_on_one_out(llama_dir, data, tmp_path):
    """D: exactly one runs; the other exits 2 at once naming the holder's pid; the survivor's output equals a lone
    run's, and its metrics read as one run."""
    subprocess.run(_cmd(llama_dir, data, tmp_path / "alone"), check=True, env=ENV)
    out = tmp_path / "shared"
    procs = [subprocess.Popen(_cmd(llama_dir, data, out), env=ENV, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    winner = next(p.pid for p, (c, _) in zip(procs, results) if c == 0)
    assert f"is in use by another r2q run (pid {winner})" in loser and "Traceback" not in loser
    _same_weights(out, tmp_path / "alone")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


# ---------------------------------------------------------------------------------------------- E: metrics


def test_resume_without_a_checkpoint_starts_metrics_over(llama_dir, data, tmp_path, capsys):
    """E: a run killed before its first checkpoint left metrics lines; --resume starts at step 0 and the file holds
    each step once."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2, 3)))
    train(ckpt_cfg(llama_dir, data, out, resume=True, save_every=0))
    assert "no checkpoint" in capsys.readouterr().err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["dpo", "sft"])
def test_resume_of_a_finished_run_without_checkpoints_is_refused(llama_dir, data, tmp_path, mode):
    """A finished run that wrote no checkpoint (no --save-every) has nothing to continue from: --resume, even with
    other settings, is one line and the run's files stay as they were (it used to train over them from step 0)."""
    out = tmp_path / "run"
    train(ckpt_cfg(llama_dir, data, out, max_steps=2, save_every=0), mode)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="holds a finished run .* and no checkpoint to continue from"):
        train(ckpt_cfg(llama_dir, data, out, max_steps=3, save_every=0, lr=1e-3, resume=True), mode)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("text", ["{garbage", '{"config": 5, "step": 2}', "[1, 2]", '{"config": {}}',
                                  '{"config": [], "step": 1}', '{"config": {}, "step": true}',
                                  '{"config": {}, "step": 2, "inputs": ""}', '{"step": 2}'])
def test_a_checkpoint_state_that_is_not_ones_own_is_skipped(llama_dir, data, tmp_path, capsys, text):
    """trainer_state.json that matches the manifest (re-hashed after an edit) but is not a state r2q wrote: that
    checkpoint is skipped with a line, and the run resumes from the one before."""
    out = tmp_path / "run"
    c = ckpt_cfg(llama_dir, data, out, max_steps=2)
    train(c)
    ck = out / "checkpoints" / "step-0000002"
    (ck / "trainer_state.json").write_text(text)
    _rehash(ck, "trainer_state.json")
    capsys.readouterr()
    res = train(dataclasses.replace(c, resume=True))
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {ck}: trainer_state.json" in err
    assert "resuming from" in err and "step-0000001" in err and res.steps == 2


def _rehash(ck: Path, name: str) -> None:
    """The manifest made to vouch for `name` as it now is (an edit that verify cannot see)."""
    import hashlib

    man = json.loads((ck / "manifest.json").read_text())
    body = (ck / name).read_bytes()
    man["files"][name] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(man))


def test_an_optimizer_state_that_does_not_fit_is_named_and_the_length_note_said_once(llama_dir, data, tmp_path,
                                                                                       capsys):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    c = ckpt_cfg(llama_dir, data, out, max_steps=2)
    train(c)
    ck = out / "checkpoints" / "step-0000002"
    save_file({"x": torch.zeros(3)}, str(ck / "optimizer.safetensors"))
    _rehash(ck, "optimizer.safetensors")
    capsys.readouterr()
    with pytest.raises(UserError, match="other settings: --lr"):  # a refusal says nothing of a new length first
        train(dataclasses.replace(c, resume=True, max_steps=3, lr=1e-2))
    assert "now ends at step" not in capsys.readouterr().err
    res = train(dataclasses.replace(c, resume=True, max_steps=3))
    err = capsys.readouterr().err
    assert f"skipping checkpoint {ck}: its optimizer or scheduler state does not fit this run's" in err
    assert err.count("--max-steps 2 -> 3; the run now ends at step 3") == 1 and res.steps == 3
    assert "resuming from" in err and "step-0000001" in err


def test_resume_refuses_other_settings_before_loading_anything(llama_dir, data, tmp_path, monkeypatch):
    import r2q.train.setup as setup

    out = tmp_path / "run"
    c = ckpt_cfg(llama_dir, data, out, max_steps=2)
    train(c)

    def no(*a, **k):
        raise AssertionError("data or weights were loaded before the settings were compared")

    monkeypatch.setattr(setup, "load_data", no)
    monkeypatch.setattr(setup, "starting_policy", no)
    with pytest.raises(UserError, match=r"step-0000002 was written by a run with other settings: --lr"):
        train(dataclasses.replace(c, resume=True, lr=1e-2))


def test_a_gradient_that_overflows_stops_the_run(llama_dir, data, tmp_path, monkeypatch):
    """A finite loss whose gradient norm is inf would be clipped to no update at all: the run stops at that step
    in one line, as for a non-finite loss, and keeps its checkpoints."""
    import r2q.train.loop as tr

    out = tmp_path / "run"
    t = tr.Trainer(ckpt_cfg(llama_dir, data, out, max_steps=4, save_every=1), "dpo")
    real, calls = t.acc.clip_grad_norm_, []

    def overflow(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return norm * float("inf") if len(calls) == 3 else norm

    monkeypatch.setattr(t.acc, "clip_grad_norm_", overflow)
    with pytest.raises(UserError, match=r"non-finite gradient norm \(inf\) at step 3.*step-0000002"):
        t.run()
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- F: symlinks


@pytest.mark.parametrize("lora", [False, True])
def test_no_link_under_out_is_written_through(llama_dir, data, tmp_path, lora):
    """F: a link planted under --out for every file a run writes (and its lock) is replaced by a regular file; the
    files the links pointed at are untouched."""
    kw = dict(max_steps=2, save_every=1, lora_r=4 if lora else 0)
    train(ckpt_cfg(llama_dir, data, tmp_path / "plain", **kw))
    names = sorted(p.name for p in (tmp_path / "plain").iterdir() if p.is_file())
    assert {".lock", "metrics.jsonl", "r2q_config.json", "tokenizer.json"} <= set(names)
    victims, out = tmp_path / "victims", tmp_path / "run"
    victims.mkdir()
    out.mkdir()
    for n in names:
        (victims / n).write_text(f"victim {n}")
        (out / n).symlink_to(victims / n)
    train(ckpt_cfg(llama_dir, data, out, overwrite=True, **kw))
    assert all((victims / n).read_text() == f"victim {n}" for n in names)
    assert all(not (out / n).is_symlink() for n in names if (out / n).exists())
    assert (out / "metrics.jsonl").is_file() and (out / "r2q_config.json").is_file()


@pytest.mark.parametrize("name", ["checkpoints", "adapter"])
def test_a_directory_link_under_out_is_refused_before_anything_is_written(llama_dir, data, tmp_path, name):
    """F, for directories: a run writes into D/checkpoints and D/adapter and prunes old checkpoints there, so a
    planted link to another directory is refused at once, with that directory and the run's files untouched."""
    kw = dict(max_steps=2, save_every=1)
    out, victim = tmp_path / "run", tmp_path / "victim"
    train(ckpt_cfg(llama_dir, data, out, **kw))
    victim.mkdir()
    (victim / "step-1").mkdir()
    (victim / "step-1" / "keep.txt").write_text("keep")
    if (out / name).exists():
        shutil.rmtree(out / name)
    (out / name).symlink_to(victim, target_is_directory=True)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=f"{name} is a symbolic link"):
        train(ckpt_cfg(llama_dir, data, out, overwrite=True, **kw))
    assert (victim / "step-1" / "keep.txt").read_text() == "keep" and sorted(p.name for p in victim.iterdir()) == [
        "step-1"]
    assert sorted(p.name for p in out.iterdir()) == before  # nothing of the earlier run removed


def test_writers_replace_links_and_never_follow_them(tmp_path):
    """F, at the level of each writer: write_atomic, append_line, save_into and the run lock."""
    from r2q.paths import RunLock, append_line, save_into, write_atomic

    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    for name in ("a.json", "log.jsonl", "weights.bin", ".lock"):
        (d / name).symlink_to(victim)
    write_atomic(d / "a.json", "{}")
    append_line(d / "log.jsonl", "{}")
    save_into(d, lambda t: (t / "weights.bin").write_bytes(b"w"))
    with RunLock(d):
        pass
    assert victim.read_text() == "keep"
    assert [(d / n).is_symlink() for n in ("a.json", "log.jsonl", "weights.bin", ".lock")] == [False] * 4
    assert (d / "log.jsonl").read_text() == "{}\n" and not list(d.glob(".tmp-save-*"))


# ---------------------------------------------------------------------------------------------- disk full


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_a_checkpoint_is_one_line_and_leaves_no_temp_dir(llama_dir, data, tmp_path, monkeypatch):
    import r2q.checkpoint as ck

    monkeypatch.setattr(ck, "save_file", _enospc)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write .*step-0000001: no space left on the device \(.* free"):
        train(ckpt_cfg(llama_dir, data, out))
    assert not list((out / "checkpoints").glob(".tmp-step-*"))


def test_disk_full_at_the_final_save_is_one_line_and_leaves_no_temp_dir(llama_dir, data, tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(*a, **k):  # what safetensors raises when the disk fills under it
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"cannot write {out}: no space left on the device"):
        train(ckpt_cfg(llama_dir, data, out, save_every=0))
    assert not list(out.glob(".tmp-save-*")) and not (out / "r2q_config.json").exists()


def test_disk_full_for_credit_and_generate_outputs_is_one_line(llama_dir, llama_ref_dir, tmp_path, capsys,
                                                                monkeypatch):
    import r2q.paths as paths

    (tmp_path / "p.txt").write_text("the film\n")
    monkeypatch.setattr(paths, "_remove_stale_temps", _enospc)  # inside the write, after the output checks
    credit = ("credit", "--model", llama_dir, "--ref", llama_ref_dir, "--prompt", "a", "--response", "b", "--quiet")
    for args in ((*credit, "--json", tmp_path / "c.json"), (*credit, "--html", tmp_path / "c.html"),
                 (*credit, "--png", tmp_path / "c.png"),
                 ("generate", "--model", llama_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g.jsonl",
                  "--method", "greedy", "--max-new-tokens", "2", "--quiet")):
        code, _, err = run_cli(capsys, *args)
        assert "no space left on the device" in one_line_error(code, err)
    assert not list(tmp_path.glob(".*.tmp"))


def test_disk_full_writing_the_reference_cache_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import r2q.refcache as refcache

    monkeypatch.setattr(refcache, "save_file", _enospc)
    path = tmp_path / "cache" / "entry.safetensors"
    with pytest.raises(UserError, match=r"cannot write .*entry.safetensors: no space left on the device"):
        refcache.save(path, [torch.zeros(3), torch.zeros(2)])
    assert not path.exists() and not list(path.parent.glob(".*.tmp"))


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_real_small_file_system(llama_dir, data, tmp_path):
    """The same through a 1 MB tmpfs, where this machine lets the test mount one."""
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the patched-write tests cover it")
    try:
        with pytest.raises(UserError, match="no space left on the device"):
            train(ckpt_cfg(llama_dir, data, mnt / "run", cache_dir=str(tmp_path / "cache")))
        assert not list((mnt / "run" / "checkpoints").glob(".tmp-step-*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------- cache, budget, ...


def test_parallel_writers_of_one_cache_entry_never_collide(tmp_path):
    from r2q import refcache

    path = tmp_path / "cache" / "key.safetensors"
    errors = []

    def write(i):
        try:
            for _ in range(5):
                refcache.save(path, [torch.full((3,), float(i)), torch.zeros(2)])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = refcache.load(path)
    assert [len(x) for x in got] == [3, 2] and not list(path.parent.glob("*.tmp"))


def test_an_unwritable_cache_dir_is_one_line_before_any_compute(llama_dir, data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "run",
                           "--precompute-ref", "--cache-dir", tmp_path / "afile" / "cache")
    assert "--cache-dir" in one_line_error(code, err) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, budget", [("best-of-n", 2_000_000_000), ("beam", 2_000_000_000),
                                            ("mcts", 2_000_000)])
def test_a_huge_budget_is_refused_before_anything_is_allocated(llama_dir, llama_ref_dir, tmp_path, capsys, method,
                                                                 budget):
    (tmp_path / "p.txt").write_text("the film\n")
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--ref", llama_ref_dir, "--prompts",
                           tmp_path / "p.txt", "--out", tmp_path / "g.jsonl", "--method", method, "--budget", budget,
                           "--max-new-tokens", "8")
    assert "r2q runs at most" in one_line_error(code, err)
    assert time.perf_counter() - t0 < 30


def test_a_search_too_wide_for_memory_is_refused(llama_dir, tmp_path, capsys, monkeypatch):
    import r2q.search.decode as search

    monkeypatch.setattr(search, "free_memory", lambda device: 10_000_000)  # 10 MB free
    (tmp_path / "p.txt").write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompts", tmp_path / "p.txt", "--out",
                           tmp_path / "g.jsonl", "--method", "beam", "--num-beams", "1000", "--max-new-tokens", "64")
    assert "GB for caches and logits; 0.0 GB are free" in one_line_error(code, err)


def test_a_pickled_lora_adapter_is_refused_with_how_to_convert(llama_dir, data, tmp_path, capsys):
    train(ckpt_cfg(llama_dir, data, tmp_path / "lora", lora_r=4, max_steps=1, save_every=0))
    d = tmp_path / "lora"
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    code, _, err = run_cli(capsys, "credit", "--model", d, "--ref", llama_dir, "--prompt", "a", "--response", "b")
    line = one_line_error(code, err)
    assert "adapter_model.bin, a pickle" in line and "save_file(torch.load" in line


def test_a_huge_line_is_cut_before_tokenising_with_the_same_tokens(tokenizer):
    """Memory follows --max-length, not the line: a multi-megabyte prompt and completion give the tokens that
    tokenising them whole and truncating would."""
    from r2q.data import preference_examples_from_rows
    from r2q.data.encode import _encode_row, _truncate

    big = " ".join(f"word{i % 97} the film" for i in range(300_000))  # ~5 MB
    row = {"prompt": big, "chosen": big, "rejected": "fine"}
    t0 = time.perf_counter()
    (ex,), report = preference_examples_from_rows([row], tokenizer, max_length=48, max_prompt_length=16)
    assert time.perf_counter() - t0 < 5
    _, p, comps, _ = _encode_row(row, tokenizer, "preference")  # whole, the slow way
    p, comps, _, _ = _truncate(p, comps, 48, 16)
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (p, comps[0], comps[1])
    assert report.n_prompt_truncated == 1 and report.n_completion_truncated == 1


# ---------------------------------------------------------------------------------------------- messages, leftovers


def test_fsdp_in_one_process_says_it_shards_nothing(llama_dir, data, tmp_path, capsys):
    train(ckpt_cfg(llama_dir, data, tmp_path / "run", fsdp=True, max_steps=1, save_every=0))
    assert "--fsdp: one process, so there is nothing to shard" in capsys.readouterr().err


def test_messages_name_the_option_to_change(llama_dir, data, tmp_path, capsys):
    import datasets

    ds_dir = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pref_rows(8, 1))}).save_to_disk(str(ds_dir))
    with pytest.raises(UserError, match="choose one with --eval-split"):
        train(ckpt_cfg(llama_dir, data, tmp_path / "a", eval_data=str(ds_dir), eval_split="test"))
    with pytest.raises(UserError, match="after --eval-fraction 0.99 held out .*; lower --eval-fraction"):
        train(ckpt_cfg(llama_dir, data, tmp_path / "b", eval_fraction=0.99))


def test_a_checkpoint_of_another_model_is_said_not_to_fit_not_damaged(tokenizer, data, tmp_path, capsys):
    """An intact checkpoint whose tensors do not fit the model now at --model (same path, other shapes) is skipped
    as not fitting, not as damaged."""
    start = _model(tmp_path, tokenizer, "start", 0)
    c = ckpt_cfg(start, data, tmp_path / "run", max_steps=2, ref="none")
    train(c)
    save_model(tiny_model("llama", len(tokenizer), seed=0, hidden=96), tokenizer, start)
    capsys.readouterr()
    with pytest.raises(UserError, match="none of the 2 checkpoints"):
        train(dataclasses.replace(c, resume=True))
    err = capsys.readouterr().err
    assert err.count("it does not fit the model being trained") == 2 and "damaged" not in err


def test_a_killed_writer_leaves_no_temp_file_behind(tmp_path):
    """A temp file a killed `credit --json` left (its writer's pid is gone) is removed by the next write there."""
    from r2q.paths import write_atomic

    stale = tmp_path / ".c.json.999999-abc.tmp"
    stale.write_text("half")
    live = tmp_path / f".c.json.{os.getpid()}-xyz.tmp"  # a writer that is still running: left alone
    live.write_text("busy")
    write_atomic(tmp_path / "c.json", "{}")
    assert not stale.exists() and live.exists()


def test_lora_and_gradient_checkpointing_runs_raise_no_future_warning_of_r2qs_making(llama_dir, data, tmp_path):
    """6f: transformers' FutureWarnings for the renamed gradient-checkpointing names (called by r2q and PEFT) are
    silenced where r2q causes them; a LoRA run with gradient checkpointing records none."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(ckpt_cfg(llama_dir, data, tmp_path / "run", max_steps=1, save_every=0, lora_r=4,
                       gradient_checkpointing=True))
    future = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert not [m for m in future if "checkpointing" in m], future

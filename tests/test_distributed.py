"""Data parallelism: `r2q train` under 2 CPU processes (gloo) gives the same run as 1 process on the same global batch.

The trainer's claim (train.py): a step consumes batch_size * processes * grad_accum examples and each process's loss
is its share of the global mean, so any split of the same global batch gives the same update. Here a 1-process run
with batch 4 is the reference, and two 2-process runs must match its weights and its logged metrics: batch 2 per
process (launched with torchrun), and batch 1 with grad_accum 2 (launched with `accelerate launch`, stopped at a
checkpoint and resumed). Float sums run in a different order, so equal means within 1e-5; the weights move by ~5e-3
over the run, and a wrong split (a lost gradient all-reduce, a mis-sized loss, a skipped or repeated micro-batch)
moves them by far more than that.

On a machine without GPUs both launchers need ACCELERATE_USE_CPU=1: without it, accelerate sees no accelerator,
ignores WORLD_SIZE and every process trains alone on a full batch (see docs/distributed.md).
"""

import json
import subprocess
import sys

import pytest
from conftest import accelerate_launch, env_for, pref_rows, run, single, torchrun, write_jsonl
from safetensors.torch import load_file

from r2q.train import TrainConfig, Trainer

TOL = 1e-5
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "kl/ref_pi_est")


def train_args(model_dir, data, out, **opts) -> list[str]:
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--lr", "2e-3",
            "--schedule", "constant", "--seed", "5", "--quiet", "--cache-dir", str(out.parent / "cache")]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(ref, got, what: str) -> None:
    a, b = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # a 2-process run that silently ran as two 1-process runs (no ACCELERATE_USE_CPU) lands here: half the batch
    assert worst < TOL, f"{what}: weights differ from the 1-process run by {worst:.2e}"
    ma, mb = metrics(ref), metrics(got)
    assert [(m["split"], m["step"]) for m in mb] == [(m["split"], m["step"]) for m in ma], what
    for x, y in zip(ma, mb):
        for k in METRICS + (("grad_norm", "learning_rate") if x["split"] == "train" else ()):
            assert y[k] == pytest.approx(x[k], rel=TOL, abs=TOL), f"{what}: {x['split']} step {x['step']} {k}"


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pref_rows(48, 0))
    # 7 rows: the two processes score uneven eval shards (4 and 3) whose sums must reduce to the 1-process mean
    evald = write_jsonl(tmp_path / "eval.jsonl", pref_rows(7, 1))
    common = dict(eval_data=evald, eval_every=2)
    ref = tmp_path / "one"
    run(single(), train_args(llama_dir, data, ref, batch_size=4, max_steps=4, **common), tmp_path)
    start = load_file(llama_dir / "model.safetensors")
    end = load_file(ref / "model.safetensors")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 100 * TOL  # the weights did move

    two = tmp_path / "two"
    run(torchrun(2), train_args(llama_dir, data, two, batch_size=2, max_steps=4, save_every=2, **common), tmp_path)
    assert_same_run(ref, two, "2 processes x batch 2")
    # each process saved its RNG state into the checkpoint
    assert (two / "checkpoints" / "step-0000004" / "rng-1.safetensors").exists()

    # 2 processes x 2 micro-batches of 1 (no_sync on the first), stopped at a checkpoint and resumed
    accum = tmp_path / "accum"
    opts = dict(batch_size=1, grad_accum=2, save_every=2, **common)
    run(accelerate_launch(2), train_args(llama_dir, data, accum, max_steps=2, **opts), tmp_path)
    assert [m["step"] for m in metrics(accum)] == [1, 2, 2]
    run(accelerate_launch(2), train_args(llama_dir, data, accum, max_steps=4, **opts) + ["--resume"], tmp_path)
    assert_same_run(ref, accum, "2 processes x batch 1 x grad_accum 2, resumed at step 2")


@pytest.mark.slow
def test_eval_with_fewer_rows_than_processes(llama_dir, tmp_path):
    """A process with no eval rows must still join the others' forwards (DDP syncs buffers in the first one), and
    the eval means count only real rows."""
    data = write_jsonl(tmp_path / "train.jsonl", pref_rows(16, 0))
    evald = write_jsonl(tmp_path / "eval.jsonl", pref_rows(1, 1))
    two = tmp_path / "two"
    run(torchrun(2), train_args(llama_dir, data, two, batch_size=2, max_steps=1, eval_data=evald), tmp_path,
        timeout=90)
    # the reference: the saved policy scored in this (1-process) interpreter against the same reference
    cfg = TrainConfig(model=str(two), ref=str(llama_dir), data=str(data), eval_data=str(evald),
                      out=str(tmp_path / "check"), quiet=True)
    want = Trainer(cfg, "dpo").evaluate()
    got = metrics(two)[-1]
    assert got["split"] == "eval"
    for k in METRICS:
        assert got[k] == pytest.approx(want[k], rel=TOL, abs=TOL), k


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume(llama_dir, tmp_path):
    """--fsdp: 2 CPU processes with FSDP2 (weights, gradients and AdamW state sharded, one unit per decoder layer)
    train to the 1-process run's weights, write whole checkpoints and a whole final model, and a run stopped at a
    checkpoint and resumed (every process loading the full state into its shards) ends at the same weights."""
    data = write_jsonl(tmp_path / "train.jsonl", pref_rows(48, 0))
    evald = write_jsonl(tmp_path / "eval.jsonl", pref_rows(7, 1))
    common = dict(eval_data=evald, eval_every=2)
    ref = tmp_path / "one"
    run(single(), train_args(llama_dir, data, ref, batch_size=4, max_steps=4, **common), tmp_path)
    fsdp = tmp_path / "fsdp"
    args = train_args(llama_dir, data, fsdp, batch_size=2, save_every=2, **common) + ["--fsdp"]
    run(torchrun(2), args + ["--max-steps", "2"], tmp_path)
    ck = fsdp / "checkpoints" / "step-0000002"
    whole = load_file(ck / "model.safetensors")
    start = load_file(llama_dir / "model.safetensors")
    assert whole.keys() == start.keys() and all(whole[k].shape == start[k].shape for k in start)  # not shards
    run(torchrun(2), args + ["--max-steps", "4", "--resume"], tmp_path)
    logs = "".join(f.read_text() for f in tmp_path.glob("log-*.txt"))
    assert logs.count("sharded over 2 processes (3 units)") == 2  # the two FSDP runs (2 decoder layers + the root)
    assert_same_run(ref, fsdp, "2 processes under FSDP2, resumed at step 2")


_LEAVES = """
import atexit, sys
atexit.register(lambda: print("atexit handler ran", flush=True))
class Finalized:
    def __del__(self):
        print("finalized", flush=True)
kept = Finalized()  # a module global: Python's finalization deletes it, os._exit does not
from r2q.cli import main
sys.argv[0] = "r2q"
main()  # as the program: the arguments are sys.argv's
"""

_IN_PROCESS = """
from r2q.cli import main
main(["version"])  # no SystemExit for code 0; a launcher's WORLD_SIZE must not end this process
print("still here")
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_process_of_a_multi_process_run_exits_without_finalization(world, tmp_path):
    """Under a launcher (WORLD_SIZE > 1) a finished command runs the atexit handlers, flushes, and exits with its
    code and without Python's finalization, where gloo's live worker threads can abort a finished run (cli._leave);
    one process exits as always. main(argv) called from Python never ends the process itself."""
    env = {**env_for(tmp_path), "WORLD_SIZE": world}
    for args, code in ((["version"], 0), (["generate", "--num-beams", "0"], 2)):
        p = subprocess.run([sys.executable, "-c", _LEAVES, *args], env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == code, p.stderr
        assert "atexit handler ran" in p.stdout
        assert ("finalized" in p.stdout) == (world == "1"), p.stdout
        if code == 0:
            assert p.stdout.startswith("r2q ")
        else:
            assert p.stderr.startswith("error: ") and len(p.stderr.splitlines()) == 1
    p = subprocess.run([sys.executable, "-c", _IN_PROCESS], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "still here", p.stdout + p.stderr

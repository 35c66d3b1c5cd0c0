"""Trackers: a DPO run reports its train and eval metrics, under TRL's names and apart (eval ones prefixed eval_), to
mlflow (a local file store) and wandb (offline), read back from what each wrote. --report-to is checked before
anything runs."""

import json

import pytest
from conftest import pref_rows, train_cfg, write_jsonl

from r2q.errors import UserError
from r2q.train import train
from r2q.train.config import trackers
from r2q.train.setup import tracker_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("trackers")
    return write_jsonl(d / "train.jsonl", pref_rows(48, 0)), write_jsonl(d / "eval.jsonl", pref_rows(16, 1))


def test_train_and_eval_metrics_reach_mlflow_apart_under_trls_names(llama_dir, data, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = (tmp_path / "mlruns").as_uri()  # a local file store (mlflow 3 asks to allow it, as it prefers a database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    res = train(train_cfg(llama_dir, data[0], tmp_path / "run", eval_data=str(data[1]), max_steps=4, eval_every=2,
                          report_to="mlflow", run_name="dpo-test"))
    client = mlflow.tracking.MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_name for r in runs] == ["dpo-test"]
    run = runs[0]
    assert run.data.params["beta"] == "0.1" and run.data.params["mode"] == "dpo"

    def history(name):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name),
                                                   key=lambda m: m.step)]

    train_m = [m for m in res.metrics if m["split"] == "train"]
    eval_m = [m for m in res.metrics if m["split"] == "eval"]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "learning_rate", "grad_norm"):
        assert history(name) == [(m["step"], pytest.approx(m[name], rel=1e-6, abs=1e-9)) for m in train_m], name
    for name in ("loss", "rewards/margins", "rewards/accuracies"):
        assert history("eval_" + name) == [(m["step"], pytest.approx(m[name], rel=1e-6, abs=1e-9)) for m in eval_m]
    assert [s for s, _ in history("eval_loss")] == [2, 4]


def wandb_history(run_file):
    """The history rows of an offline wandb run, read from its .wandb file: a ':W&B' header, then LevelDB-style
    chunks (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each record a
    protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            if rec.WhichOneof("record_type") == "run":
                rows.append({"_run_name": rec.run.display_name})
    return rows


def wandb_rows_when_written(run_file, last_step, wait_s=30.0):
    """The run's rows once wandb's service has written them. `finish()` returned, but the service process writes the
    .wandb file itself: once (in CI, 2026-12-07) the file held its header only when read at once. Ending the service
    (`wandb.teardown`) closes its streams; then the rows are polled for, up to wait_s, and a file that never gets
    them fails the test below on what it holds."""
    import time

    import wandb

    wandb.teardown()
    deadline = time.monotonic() + wait_s
    while True:
        rows = wandb_history(run_file)
        if any(r.get("_step") == last_step for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_wandb_offline_gets_the_same_metrics(llama_dir, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    res = train(train_cfg(llama_dir, data[0], out, eval_data=str(data[1]), max_steps=4, eval_every=2,
                          report_to="wandb"))
    files = list(out.glob("wandb/offline-run-*/*.wandb"))
    assert len(files) == 1
    rows = wandb_rows_when_written(files[0], last_step=4)
    assert rows and rows[0] == {"_run_name": "run"}  # --run-name defaults to the name of --out
    by_step = {r["_step"]: r for r in rows[1:]}
    for m in res.metrics:
        pre = "eval_" if m["split"] == "eval" else ""
        for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert by_step[m["step"]][pre + name] == pytest.approx(m[name], rel=1e-6, abs=1e-9)
    assert by_step[4]["eval_loss"] != by_step[4]["loss"]


def test_tracker_lines_keep_numbers_and_prefix_eval():
    assert tracker_metrics({"step": 3, "split": "eval", "loss": 0.5, "rewards/margins": 1.0}) == \
        {"eval_loss": 0.5, "eval_rewards/margins": 1.0}
    assert tracker_metrics({"step": 3, "split": "train", "loss": 0.5, "epoch": 0.2}) == {"loss": 0.5, "epoch": 0.2}


def test_report_to_is_checked_by_name_and_by_what_is_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    assert trackers("none") == [] and trackers("") == []
    with pytest.raises(UserError, match="--report-to tensorbored: not a tracker; choose from tensorboard, wandb"):
        trackers("tensorbored")
    with pytest.raises(UserError, match=r"--report-to comet_ml: comet_ml is not installed \(pip install comet_ml\)"):
        trackers("mlflow,comet_ml")
    assert "comet_ml" not in trackers("all")

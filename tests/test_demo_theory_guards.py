"""Inputs of `r2q demo` and `r2q theory` an audit found mishandled: two demos on one --out, a --out holding someone
else's files (replaced or mixed with), an empty --out (the current directory), seeds beyond what the stages take
(found only after the shared stages ran, and named --seed), and a --profile the help did not list. Each is one line
(exit 2) before any compute, with nothing written or removed; an earlier demo's or theory's directory is reused.
No demo or theory check really runs here: their compute is replaced by a stub that fails (or stops) when reached."""

import json
import os
from pathlib import Path

import pytest
from conftest import one_line_error, run_cli

import r2q.demo.pipeline as pipeline
import r2q.theory.report as theory_report
from r2q.config import INT_MAX
from r2q.demo import DemoConfig
from r2q.demo.config import parse_seeds
from r2q.demo.outdir import MARKER, check_demo_out
from r2q.demo.profile import ABOUT, PROFILES
from r2q.errors import UserError
from r2q.paths import RunLock
from r2q.theory.checks import CheckResult
from r2q.theory.outdir import check_theory_out


class Reached(Exception):
    """Raised by a stub in place of the demo's stages or the theory checks: the run got past its checks."""


def _stop(*a, **k):
    raise Reached


def _must_not_run(*a, **k):
    pytest.fail("compute started: the input should have been refused before it")


@pytest.fixture
def no_compute(monkeypatch):
    for target in ("r2q.demo.pipeline._Runner.run", "r2q.demo.pipeline._compute", "r2q.demo.stages.Stages.compute",
                   "r2q.theory.report.default_mdp"):
        monkeypatch.setattr(target, _must_not_run)


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every path under d, with the bytes of each file (None for a directory)."""
    return {str(p.relative_to(d)): None if p.is_dir() else p.read_bytes() for p in sorted(d.rglob("*"))}


def _stage_json(path: Path, seed: int | None) -> Path:
    """A demo stage's record, as stages.Stages.compute writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": "0123abcd", "seconds": 1.0, "result": {},
                                "provenance": {"commit": "x", "seed": seed}}))
    return path


def _theory_summary(path: Path) -> Path:
    path.write_text(json.dumps({"seed": 0, "quick": True, "passed": True, "seconds": 1.0, "checks": {}}))
    return path


# ------------------------------------------------------------------ what a directory is


def _foreign(d: Path) -> None:
    (d / "notes.txt").write_text("my notes")


def _train_run(d: Path) -> None:
    (d / "r2q_config.json").write_text('{"mode": "dpo"}')
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (d / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")


def _theory_dir(d: Path) -> None:
    _theory_summary(d / "summary.json")
    (d / "report.html").write_text("<html>theory</html>")


def _someones_summary_and_data(d: Path) -> None:
    (d / "summary.json").write_text('{"mine": 1}')
    (d / "data").mkdir()
    (d / "data" / "reviews.jsonl").write_text('{"text": "mine"}\n')


def _a_demos_seed_dir(d: Path) -> None:  # DEMO/seed-0 given as --out: its per-seed stages are not a demo run
    _stage_json(d / "pairs" / "stage.json", seed=0)


NOT_A_DEMO = [_foreign, _train_run, _theory_dir, _someones_summary_and_data, _a_demos_seed_dir]


def _marked(d: Path) -> None:
    (d / MARKER).write_text("r2q demo\n")


def _old_demo_shared_stage(d: Path) -> None:  # a demo of r2q before the marker: its stages' records say it
    _stage_json(d / "data" / "stage.json", seed=None)
    (d / "data" / "reviews.jsonl").write_text("{}\n")


def _old_demo_seed_stage(d: Path) -> None:
    _stage_json(d / "seed-3" / "pairs" / "stage.json", seed=3)


def _old_demo_summary(d: Path) -> None:
    (d / "summary.json").write_text(json.dumps({"profile": "tiny", "seeds": [0], "shared_stages": ["data"],
                                                "per_seed": {}}))
    (d / "report.html").write_text("<html>demo</html>")


def _only_a_lock(d: Path) -> None:  # another command's lock in an otherwise empty directory
    (d / ".lock").write_text("")


A_DEMO = [_marked, _old_demo_shared_stage, _old_demo_seed_stage, _old_demo_summary, _only_a_lock]


@pytest.mark.parametrize("make", NOT_A_DEMO, ids=lambda f: f.__name__)
def test_demo_refuses_an_out_that_holds_something_else_before_any_compute(make, tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = snapshot(out)
    code, _, err = run_cli(capsys, "demo", "--out", out, "--profile", "tiny", "--quiet")
    line = one_line_error(code, err)
    assert f"--out {out} is not empty and holds no earlier demo run" in line
    assert snapshot(out) == before  # no lock file, no marker, nothing replaced


@pytest.mark.parametrize("make", [None, *A_DEMO], ids=lambda f: f.__name__ if f else "new")
def test_demo_takes_a_new_or_empty_out_or_an_earlier_demo_and_locks_it(make, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if make is not None:
        out.mkdir()
        make(out)
    before = snapshot(out) if out.exists() else {}
    seen = {}

    def stages_run(self):
        with pytest.raises(UserError) as e:  # a second run now: the first holds the lock
            RunLock(out).acquire()
        seen["second"] = str(e.value)
        raise Reached

    monkeypatch.setattr(pipeline._Runner, "run", stages_run)
    with pytest.raises(Reached):
        pipeline.run(DemoConfig(out=str(out), profile="tiny", quiet=True))
    assert f"pid {os.getpid()}" in seen["second"] and "in use by another r2q run" in seen["second"]
    assert (out / MARKER).is_file()  # a run killed in its first stage leaves a directory the next one takes
    def stages(snap):
        return {k: v for k, v in snap.items() if k not in (MARKER, ".lock")}

    assert stages(snapshot(out)) == stages(before)  # an earlier demo's stages are kept for reuse
    RunLock(out).acquire().release()  # the lock went with the run
    check_demo_out(out)  # and the directory is a demo's now


def test_a_second_demo_on_one_out_stops_in_one_line_naming_the_first(tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    out.mkdir()
    _old_demo_shared_stage(out)
    _old_demo_summary(out)
    first = RunLock(out).acquire()  # a running demo (this process: its pid is the holder's)
    try:
        before = snapshot(out)
        code, _, err = run_cli(capsys, "demo", "--out", out, "--profile", "tiny", "--quiet")
        line = one_line_error(code, err)
        assert "in use by another r2q run" in line and f"(pid {os.getpid()})" in line
        assert snapshot(out) == before
    finally:
        first.release()


def test_an_empty_out_is_refused_not_taken_as_the_current_directory(tmp_path, capsys, monkeypatch, no_compute):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    for cmd in ("demo", "theory"):
        for blank in ("", "  "):
            code, _, err = run_cli(capsys, cmd, "--out", blank, "--quiet")
            assert "--out is empty" in one_line_error(code, err), cmd
    with pytest.raises(UserError, match="--out is empty"):
        theory_report.run("", quick=True, progress=False)
    with pytest.raises(UserError, match="--out is empty"):
        check_demo_out("")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


# ------------------------------------------------------------------ seeds and profiles


@pytest.mark.parametrize("seeds, msg", [
    ("2147483648", "at most 2,147,483,647"), ("0,2147483648", "got 2147483648"),
    ("9" * 5000, "at most 2,147,483,647"), ("-1", "distinct integers >= 0"), ("1,1", "1 is given twice"),
    ("0, 1 ,0", "0 is given twice"), ("1.5", "'1.5' is not one"), ("0,x", "comma-separated integers"),
    ("0,,1", "an empty item"), (",", "an empty item"), ("1e3", "comma-separated integers")])
def test_bad_seeds_are_refused_by_the_options_naming_seeds(seeds, msg):
    with pytest.raises(UserError, match=msg) as e:
        DemoConfig(out="never-made", seeds=seeds)
    assert str(e.value).startswith("--seeds ")
    assert not Path("never-made").exists()


def test_good_seeds_parse():
    assert parse_seeds(str(INT_MAX)) == (INT_MAX,)
    assert parse_seeds(" 3 , 1,+2") == (3, 1, 2)
    assert parse_seeds("") == parse_seeds("  ") == ()  # the profile's seeds


def test_a_seed_too_large_stops_the_cli_before_any_stage(tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "demo", "--out", out, "--profile", "tiny", "--seeds", "0,2147483648", "--quiet")
    line = one_line_error(code, err)
    assert line.startswith("error: --seeds ") and "2147483648" in line
    assert not out.exists()


def test_demo_help_lists_every_profile(capsys):
    code, text, _ = run_cli(capsys, "demo", "--help")
    assert code == 0
    profile_help = text[text.index("--profile"): text.index("--seeds")]
    for name in PROFILES:
        assert name in profile_help, name
    assert set(ABOUT) == set(PROFILES)  # every profile has its line


# ------------------------------------------------------------------ theory


@pytest.mark.parametrize("make", [_foreign, _someones_summary_and_data, _marked, _old_demo_shared_stage,
                                  _train_run], ids=lambda f: f.__name__)
def test_theory_refuses_an_out_that_is_not_an_earlier_report(make, tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    (out / "report.html").write_text("<html>someone's report</html>")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "theory", "--out", out, "--quick", "--quiet")
    assert f"--out {out} is not empty and is not an earlier theory report" in one_line_error(code, err)
    assert snapshot(out) == before


def test_theory_takes_an_empty_dir_or_what_a_killed_run_left(tmp_path):
    figures = theory_report.FIGURES
    assert check_theory_out(tmp_path / "new", figures) == tmp_path / "new"
    assert check_theory_out(tmp_path, figures) == tmp_path
    (tmp_path / "optimum.png").write_bytes(b"\x89PNG")
    (tmp_path / ".summary.json.12345-abcd.tmp").write_text("{")
    assert check_theory_out(tmp_path, figures) == tmp_path
    (tmp_path / "summary.png").write_bytes(b"\x89PNG")  # not one of the figures
    with pytest.raises(UserError, match="summary.png"):
        check_theory_out(tmp_path, figures)


def _fake_check(name):
    def check(*a, **k):
        return CheckResult(key=f"fake-{name}", title=name, claim="holds", passed=True, numbers={"x": 1.0},
                           columns=["x"], rows=[[1.0]])
    return check


def test_theory_rewrites_an_earlier_report_atomically_and_leaves_other_files(tmp_path, monkeypatch):
    names = ("optimum", "sampled", "transformer", "argmax", "falling", "arithmetic")
    for name in names:  # instant stand-ins for the checks, with no figures
        monkeypatch.setattr(theory_report, f"check_{name}", _fake_check(name))
    monkeypatch.setattr(theory_report, "default_mdp", lambda *a, **k: None)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = _theory_summary(tmp_path / "elsewhere.json")  # an earlier report's summary.json is a link here
    kept = elsewhere.read_bytes()
    (out / "summary.json").symlink_to(elsewhere)
    (out / "report.html").write_text("<html>old</html>")
    (out / "notes.txt").write_text("mine")
    summary = theory_report.run(out, seed=0, quick=True, progress=False)
    assert set(summary["checks"]) == {f"fake-{n}" for n in names}
    assert not (out / "summary.json").is_symlink() and json.loads((out / "summary.json").read_text()) == summary
    assert elsewhere.read_bytes() == kept  # the link was replaced, not written through
    assert "fake-optimum" in (out / "report.html").read_text()
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_second_theory_run_on_one_out_stops_in_one_line(tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    out.mkdir()
    _theory_summary(out / "summary.json")
    first = RunLock(out).acquire()  # a theory run writing here (this process: its pid is the holder's)
    try:
        before = snapshot(out)
        code, _, err = run_cli(capsys, "theory", "--out", out, "--quick")
        line = one_line_error(code, err)
        assert "in use by another r2q run" in line and f"(pid {os.getpid()})" in line
        assert snapshot(out) == before
    finally:
        first.release()

"""The command line answers before it loads anything heavy: --help, version and every option error run in a fresh
interpreter without importing torch, transformers, accelerate, datasets, peft, numpy or matplotlib, and still say
what they said before (exit code, one-line error). The library keeps its public names, each loaded on first use."""

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "numpy", "matplotlib", "sklearn", "pyarrow")

# the console script's entry point, then the heavy modules that were imported, written where R2Q_PROBE says
PROBE = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["R2Q_PROBE"], "w").write(json.dumps(sorted(sys.modules))))
from r2q.cli import main
sys.argv[0] = "r2q"
main()
"""


def r2q(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `r2q ARGS` in a fresh interpreter: the result and the heavy packages it imported."""
    probe = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ, "R2Q_PROBE": str(probe)}, timeout=120)
    loaded = json.loads(probe.read_text())
    return r, [m for m in HEAVY if m in loaded]


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sft", "--help"], ["generate", "--help"],
                                  ["credit", "--help"], ["demo", "--help"], ["theory", "--help"],
                                  ["inspect-data", "--help"]])
def test_help_loads_nothing_heavy(tmp_path, args):
    r, heavy = r2q(tmp_path, *args)
    assert r.returncode == 0 and "Usage" in r.stdout and "--" in r.stdout, r.stderr
    assert heavy == [], f"r2q {' '.join(args)} imported {heavy}"


def test_version_loads_nothing_heavy(tmp_path):
    from r2q import __version__

    r, heavy = r2q(tmp_path, "version")
    assert (r.returncode, r.stdout.strip(), heavy) == (0, f"r2q {__version__}", [])


TRAIN = ["train", "--model", "m", "--data", "d.jsonl", "--out", "o"]


@pytest.mark.parametrize(("args", "says"), [
    (TRAIN + ["--beta", "-1"], "--beta must be greater than 0; got -1"),
    (TRAIN + ["--batch-size", "many"], "Invalid value for '--batch-size'"),
    (TRAIN + ["--no-such-option"], "No such option: --no-such-option"),
    (TRAIN + ["--loss", "hinge"], "--loss must be one of sigmoid, ipo, cdpo; got 'hinge'"),
    (["sft", "--max-length", "8", "--max-prompt-length", "0"], "--max-prompt-length must be at least 1"),
    (["generate", "--model", "m", "--prompts", "p.txt", "--out", "g.jsonl", "--method", "reward-beam"], "--ref"),
    (["generate", "--model", "m", "--prompts", "p.txt", "--out", "g.jsonl", "--num-beams", "0"], "--num-beams"),
    (["generate", "--model", "m", "--prompts", "p.txt", "--out", "g.jsonl"], "p.txt: no such file"),
    (["credit", "--prompt", "a", "--response", "b"], "--model is required"),
    (["credit", "--model", "m", "--max-length", "8", "--max-prompt-length", "8"], "must be less than --max-length"),
    (["demo", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["theory", "--seed", "-1"], "--seed must be at least 0"),
    (["inspect-data", "d.jsonl"], "--model is required"),
    (["train"], "--model is required"),
])
def test_option_errors_are_one_line_and_load_nothing_heavy(tmp_path, args, says):
    r, heavy = r2q(tmp_path, *args)
    assert says in one_line(r)
    assert heavy == [], f"r2q {' '.join(args)} imported {heavy} before failing"


@pytest.mark.parametrize(("name", "text", "says"), [
    ("bad.json", json.dumps({"beta": 0.1, "no_such_option": 1}), "unknown option 'no_such_option'"),
    ("bad.json", json.dumps({"max_steps": "ten"}), "'max_steps' must be an integer, got str 'ten'"),
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.yaml", "beta: [unclosed", "not valid YAML"),
    ("missing.yaml", None, "cannot read it"),
])
def test_bad_config_files_are_one_line_and_load_nothing_heavy(tmp_path, name, text, says):
    if text is not None:
        (tmp_path / name).write_text(text)
    r, heavy = r2q(tmp_path, "train", "--config", name, "--out", "o")
    assert says in one_line(r)
    assert heavy == []


LAZY = ("r2q", "r2q.train", "r2q.demo", "r2q.theory", "r2q.search")
OPTIONS = ("r2q.config", "r2q.credit_config", "r2q.train.config", "r2q.search.config", "r2q.demo.config",
           "r2q.theory.config")


def test_the_packages_and_options_import_without_torch():
    code = f"import sys; import {', '.join(LAZY + OPTIONS)}; print([m for m in {HEAVY!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("package", LAZY)
def test_every_public_name_is_still_there(package):
    """Each name in __all__ resolves (and is listed by dir), and none is also a submodule's name: importing that
    submodule would set the package attribute and shadow the name."""
    pkg = importlib.import_module(package)
    subs = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not set(pkg.__all__) & subs, set(pkg.__all__) & subs
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None and name in dir(pkg), name
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018


def test_old_import_paths_still_work():
    from r2q import UserError, dpo_loss, implicit_rewards  # noqa: F401
    from r2q.credit import CreditConfig
    from r2q.credit_config import CreditConfig as Home
    from r2q.demo import DemoConfig
    from r2q.demo.pipeline import DemoConfig as OldDemo
    from r2q.theory import TheoryConfig
    from r2q.theory.report import TheoryConfig as OldTheory
    from r2q.train import TrainConfig, train  # noqa: F401

    assert CreditConfig is Home and DemoConfig is OldDemo and TheoryConfig is OldTheory
    assert TrainConfig is importlib.import_module("r2q.train.config").TrainConfig


def test_the_loss_choices_are_the_losses():
    """--loss's choices are named in the torch-free options; they must be the losses dpo_loss computes."""
    from r2q.losses import LOSS_TYPES
    from r2q.train.config import LOSS_TYPES as OPTION_CHOICES

    assert OPTION_CHOICES == LOSS_TYPES


@pytest.mark.parametrize("package", ["r2q.train", "r2q.search"])
def test_the_packages_imports_name_what_it_exports(package):
    """The `if TYPE_CHECKING` imports of r2q.train and r2q.search (what the demo's stage hashes follow to their
    code) name exactly the lazily exported names and where each lives."""
    pkg = importlib.import_module(package)
    tree = ast.parse(Path(pkg.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    named = {a.name: node.module for node in block.body for a in node.names}
    assert named == pkg._MODULE

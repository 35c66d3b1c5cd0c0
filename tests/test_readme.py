"""The README stays true: its quickstart commands run as written, its Python snippet runs, and every function its
table of the paper's equations names exists."""

import importlib
import math
import re
import shlex
import shutil
from pathlib import Path

import torch
from conftest import pref_rows, run_cli, write_jsonl

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block(after: str, lang: str) -> str:
    """The first ```lang block after the heading `after`."""
    rest = README[README.index(after):]
    return re.search(rf"```{lang}\n(.*?)```", rest, re.S).group(1)


def test_quickstart_runs_as_written(llama_dir, llama_ref_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_dir, "my-sft")
    write_jsonl(tmp_path / "pairs.jsonl", pref_rows(16, 0))
    write_jsonl(tmp_path / "heldout.jsonl", pref_rows(4, 1))
    (tmp_path / "prompts.txt").write_text("the movie was\na film\n")
    commands = [ln for ln in block("## Quickstart", "bash").splitlines() if ln.startswith("r2q ")]
    assert len(commands) >= 3
    for line in commands:
        code, out, err = run_cli(capsys, *shlex.split(line)[1:])
        assert code == 0, f"{line}\n{err}"
    assert (tmp_path / "runs/dpo/model.safetensors").exists()
    assert "chosen" in (tmp_path / "credit.json").read_text() and (tmp_path / "credit.html").exists()
    assert len((tmp_path / "beams.jsonl").read_text().splitlines()) == 2


def test_python_snippet_runs(tokenizer, llama_dir):
    from r2q.models import load_model

    rows = pref_rows(3, 0)
    enc, chosen, rejected = ([tokenizer(r[k], add_special_tokens=False)["input_ids"] for r in rows]
                             for k in ("prompt", "chosen", "rejected"))
    policy = load_model(llama_dir).eval()
    scope = dict(prompts=enc, chosen=chosen, rejected=rejected, pad_id=tokenizer.pad_token_id, policy=policy,
                 reference=policy, B=len(rows))
    with torch.no_grad():
        exec(block("## The paper in functions", "python"), scope)
    # the policy is its own reference here: every token reward is 0, the implicit Q too, and the loss is ln 2
    assert scope["r"].abs().max() == 0 and scope["q"].abs().max() == 0
    assert math.isclose(scope["loss"].item(), math.log(2), rel_tol=1e-6)


def test_every_function_in_the_equation_table_exists():
    table = README[README.index("## The paper in functions"):README.index("```python")]
    names = re.findall(r"`(r2q(?:\.\w+)+)", table)
    assert len(names) >= 12
    for name in names:
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for p in parts[1:]:
            obj = getattr(obj, p)  # fails, naming the missing one, if the README names what is not there
        assert callable(obj), name

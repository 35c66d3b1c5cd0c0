"""docs/cli.md is the reference the command line generates: regenerate it with `python -m r2q.clidoc > docs/cli.md`
whenever an option changes."""

from pathlib import Path

from r2q.clidoc import markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_the_command_reference_is_current():
    assert DOC.read_text() == markdown(), "docs/cli.md is stale: run python -m r2q.clidoc > docs/cli.md"


def test_the_reference_lists_every_command_and_option():
    from typer.main import get_command

    from r2q.cli import app

    group = get_command(app)
    ctx = group.make_context("r2q", [], resilient_parsing=True)
    text = markdown()
    for name in group.list_commands(ctx):
        assert f"## `r2q {name}`" in text
        for p in group.get_command(ctx, name).params:
            if p.param_type_name == "option" and p.name != "help":
                assert f"`{p.opts[0]}`" in text, (name, p.opts)

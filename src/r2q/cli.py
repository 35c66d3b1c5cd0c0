"""The `r2q` command line: thin wrappers that parse options and call the library.

Only the options are loaded at start-up: each command's config dataclass (torch-free modules) and typer. The
engines (torch, transformers and the modules that use them) are imported inside each command once its options are
checked, so `r2q --help`, `r2q version` and every option error answer at once (tests/test_startup.py keeps this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .commands import quiet_transformers, run_credit, run_generate
from .config import (
    attention_option,
    check_options,
    check_prompt_fits,
    field_type,
    option,
    read_config_file,
)
from .credit_config import CreditConfig
from .demo.config import DemoConfig
from .errors import UserError
from .search.config import GenerateConfig
from .theory.config import TheoryConfig
from .train.config import DPO_ONLY, TrainConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Token-level DPO: train a policy, see which tokens it rewards, and search over it.",
)
out = Console()


@app.command()
def version() -> None:
    """Print the r2q version."""
    out.print(f"r2q {__version__}")


@dataclasses.dataclass
class InspectConfig:
    """Options of `r2q inspect-data`; the CLI is generated from these fields. The counting itself is
    r2q.data.inspect_data, which Python users call directly."""

    data: str = option("", "Preference or SFT data (.jsonl, .json, .parquet, .csv, dataset dir)", positional=True)
    model: str = option("", "Model (or tokenizer) directory whose tokenizer to use")
    max_length: int = option(1024, "Max tokens of prompt + completion", ge=2)
    max_prompt_length: int = option(512, "Max prompt tokens (cut from the left); less than --max-length", ge=1)

    def __post_init__(self):
        check_options(self)
        check_prompt_fits(self.max_length, self.max_prompt_length)
        if not self.model:
            raise UserError("--model is required (its tokenizer counts the tokens)")


def _inspect_data(cfg: InspectConfig) -> None:
    from .data import inspect_data as _inspect
    from .models import config_position_limit, load_tokenizer

    quiet_transformers()
    limit = config_position_limit(cfg.model)
    info = _inspect(cfg.data, load_tokenizer(cfg.model), max_length=cfg.max_length,
                    max_prompt_length=cfg.max_prompt_length, position_limit=limit)
    table = Table(title=escape(f"{cfg.data} ({info['kind']}, {info['format']})"))
    table.add_column("field")
    for col in ("p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    for field, pct in info["lengths"].items():
        table.add_row(field, *(str(pct[c]) for c in ("p50", "p90", "p99", "max")))
    out.print(table)
    out.print(
        f"rows {info['rows']}  kept {info['kept']}  skipped {info['skipped']}  "
        f"prompt truncated {info['prompt_truncated']}  completion truncated {info['completion_truncated']}"
    )
    if info["kind"] == "preference":  # pairs with no preference left: the loss is ln 2 whatever the model
        out.print(f"chosen identical to rejected {info['identical']}  made identical by the cut "
                  f"{info['identical_after_cut']}")
    if info["over_position_limit"]:
        out.print(f"{info['over_position_limit']} examples are longer than the {limit} positions the model embeds "
                  f"(the longest is {info['longest']} tokens; train and credit refuse them): --max-length {limit} "
                  "cuts them", markup=False, highlight=False)
    if len(info["formats"]) > 1:
        out.print("formats " + ", ".join(f"{k} {v}" for k, v in info["formats"].items()), markup=False,
                  highlight=False)
    for msg in info["skipped_rows"]:
        out.print(f"  skipped: {msg}", markup=False, highlight=False)


def _options_from(cls, hide: tuple[str, ...] = ()):
    """Turn a config dataclass into a typer signature: one --option (or argument) per field, help and range from
    the field's metadata (see r2q.config.option); those in `hide` are taken (for the config to refuse them in one
    line) but not listed in --help."""
    params = []
    for f in dataclasses.fields(cls):
        typ = field_type(f)  # an Enum option (e.g. --early-stopping) is its value's string; the config converts it
        shown: bool | str = f.default != ""
        if isinstance(f.default, str) and not f.default.isprintable():  # e.g. a newline: shown as \n
            shown = f.default.encode("unicode_escape").decode()
        shown = f.metadata.get("shown") or shown
        default = f.default.value if isinstance(f.default, Enum) else f.default
        if f.metadata.get("positional"):
            opt = typer.Argument(help=f.metadata.get("help", ""), show_default=shown)
            default = inspect.Parameter.empty if f.default == "" else f.default
        else:
            opt = typer.Option(help=f.metadata.get("help", ""), show_default=shown, hidden=f.name in hide)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[typ, opt]))
    return inspect.Signature(params)


def _config_param(record: bool) -> inspect.Parameter:
    """--config; record: the command's options are train's, so a run's r2q_config.json is a config file too."""
    help = ("A YAML or JSON file of options (keys are option names, e.g. max_length: 512); options given on the "
            "command line override it" + (". A run's r2q_config.json is one" if record else ""))
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default="",
                             annotation=Annotated[str, typer.Option(help=help, show_default=False)])


def _config_command(name: str, cls, doc: str, run, extra: list | None = None, hide: tuple[str, ...] = ()) -> None:
    """A command whose options are the fields of config dataclass `cls` (plus `extra` parameters, handed to `run` by
    name, and --config; `hide`: fields left out of --help): `run(cls(**fields), **extra)`, fields from --config
    where the command line leaves them at their default."""
    names = {f.name for f in dataclasses.fields(cls)}
    extra = extra or []
    assert not names & {p.name for p in extra} and "config" not in names

    def command(ctx: typer.Context, config: str = "", **kw) -> None:
        if config:  # what the command line gave (not left at its default) wins over the file
            given = {k for k in names if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
            kw.update({k: v for k, v in read_config_file(config, cls).items() if k not in given})
        with warnings.catch_warnings(record=True) as said:  # what the Python API warns of, the CLI refuses
            warnings.simplefilter("always", UserWarning)
            cfg = cls(**{k: v for k, v in kw.items() if k in names})
        if warned := [w for w in said if issubclass(w.category, UserWarning)]:
            raise UserError(str(warned[0].message))
        run(cfg, **{k: v for k, v in kw.items() if k not in names})

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context] + extra + [_config_param(cls is TrainConfig)] +
                                              list(_options_from(cls, hide).parameters.values()))
    command.__doc__ = doc
    app.command(name)(command)


def _train(cfg, name: str, mode: str) -> None:
    for req in ("model", "data", "out"):
        if not getattr(cfg, req):
            raise UserError(f"--{req} is required")
    quiet_transformers()
    from .train import train

    res = train(cfg, mode=mode)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: the summary once, from the main one
        return
    final = {k: v for k, v in (res.metrics[-1] if res.metrics else {}).items() if isinstance(v, float)}
    out.print(f"{name}: {res.steps} steps, model saved to {res.out}", markup=False, highlight=False)
    if final:
        out.print("  ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:8]), highlight=False)


_config_command("train", TrainConfig, "Token-level DPO training of a causal LM on preference pairs.",
                lambda cfg: _train(cfg, "train", "dpo"))
_config_command("sft", TrainConfig, "Supervised fine-tuning on completions (prompt/completion, text, messages or "
                "chosen).", lambda cfg: _train(cfg, "sft", "sft"), hide=DPO_ONLY)


def _generate_command() -> None:
    def command(cfg: GenerateConfig, model: str, prompts: Path, out_path: Path, ref: str, base: str, dtype: str,
                attn_implementation: str, quiet: bool, trust_remote_code: bool) -> None:
        run_generate(cfg, model, prompts, out_path, ref, base, dtype, attn_implementation, quiet, trust_remote_code,
                     out)

    base_params = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[str, typer.Option(help="Policy model directory")]),
        inspect.Parameter("prompts", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option(help="Prompts: .txt (one per line), or a data file "
                                                                  "or data set directory with a 'prompt' field")]),
        inspect.Parameter("out_path", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option("--out", help="Output .jsonl, one line per prompt")]),
        inspect.Parameter("ref", inspect.Parameter.KEYWORD_ONLY, default="",
                          annotation=Annotated[str, typer.Option(
                              help="Reference model (implicit rewards, reward-beam, chunk-beam and guided's untuned "
                                   "model)")]),
        inspect.Parameter("base", inspect.Parameter.KEYWORD_ONLY, default="",
                          annotation=Annotated[str, typer.Option(
                              help="The model chunk-beam and guided decode from (default: the reference)")]),
        inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default="fp32",
                          annotation=Annotated[str, typer.Option(help="fp32, bf16 or fp16 weights")]),
        inspect.Parameter("attn_implementation", inspect.Parameter.KEYWORD_ONLY, default="",
                          annotation=Annotated[str, typer.Option(help=attention_option().metadata["help"],
                                                                 show_default="the model's")]),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(help="No progress bar")]),
        inspect.Parameter("trust_remote_code", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(
                              help="Run Python code shipped in the model's directory (transformers' "
                                   "trust_remote_code); off: only installed code runs")]),
    ]
    _config_command("generate", GenerateConfig, "Decode with search over the policy: beam, reward-beam, best-of-n, "
                    "chunk-beam, mcts, ...", command, base_params)


_generate_command()


def _theory(cfg: TheoryConfig) -> None:
    quiet_transformers()
    from .theory import run as run_theory

    summary = run_theory(cfg.out, seed=cfg.seed, quick=cfg.quick, progress=not cfg.quiet)
    if not summary["passed"]:
        raise UserError(f"some theory checks failed; see {Path(cfg.out) / 'report.html'}")


def _demo(cfg: DemoConfig) -> None:
    quiet_transformers()
    from .demo import run as run_demo

    run_demo(cfg)


_config_command("credit", CreditConfig, "Per-token implicit rewards beta*log pi/pi_ref: terminal heatmap, HTML, PNG "
                "and JSON.", run_credit)
_config_command("demo", DemoConfig, "The paper's three findings on the built-in imdb-sentiment task, from scratch, "
                "with a report.", _demo)
_config_command("theory", TheoryConfig, "Exact checks of the paper's identities on a token-level MDP where Q* is "
                "known.", _theory)
_config_command("inspect-data", InspectConfig, "Counts, token length percentiles, truncation and bad rows of a data "
                "file.", _inspect_data)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback. As the program (argv
    None: `r2q`, `python -m r2q.cli`) in one process of several, it ends with `_leave`; called with argv from
    Python, it raises SystemExit as usual."""
    code = _command(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave(code)
    if code:
        sys.exit(code)


def _command(argv: list[str] | None) -> int:
    """Run one command; its exit code."""
    try:
        rc = app(args=argv, prog_name="r2q", standalone_mode=False)
    except UserError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2
    except typer.Abort:  # Ctrl-C
        sys.stderr.write("error: aborted\n")
        return 130
    except typer.TyperException as e:  # click's parse errors (bad value, unknown option), worded on one line
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        if not msg.strip():  # `r2q` alone: the help was printed
            return 2
        ctx = getattr(e, "ctx", None)
        hint = f" (see r2q {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else ""
        sys.stderr.write(f"error: {' '.join(msg.split())}{hint}\n")
        return 2
    return rc if isinstance(rc, int) else 0


def _leave(code: int) -> NoReturn:
    """End one process of a multi-process run (torchrun, accelerate launch) once its command has returned: the
    atexit handlers run while Python is whole (trackers, logging), the streams are flushed, and the process exits
    without Python's finalization. Finalizing with gloo's worker threads alive (FSDP2 keeps the process group
    referenced from C++, so destroying the group does not join them) can abort a run that has finished: a worker
    that takes the GIL while the interpreter shuts down ends in std::terminate ("terminate called without an
    active exception", pytorch/pytorch#38228), and the launcher reports the whole run as failed."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

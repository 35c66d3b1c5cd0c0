"""The `r2q` command line: thin wrappers that parse options and call the library.

Only the options are loaded at start-up: each command's config dataclass (torch-free modules) and typer. The
engines (torch, transformers and the modules that use them) are imported inside each command once its options are
checked, so `r2q --help`, `r2q version` and every option error answer at once (tests/test_startup.py keeps this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
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
from .config import (
    ATTENTION,
    attention_option,
    check_attention,
    check_options,
    check_prompt_fits,
    field_type,
    option,
    read_config_file,
)
from .credit_config import CreditConfig
from .demo.config import DemoConfig
from .errors import UserError, note
from .paths import check_out_file, check_outputs_spare_inputs, write_atomic
from .record import read_record, reference_changed
from .search.config import GenerateConfig, check_models
from .theory.config import TheoryConfig
from .train.config import TrainConfig

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


def _quiet_transformers() -> None:
    """transformers' logs below errors and its progress bars off: each command calls this where it starts loading
    the engines (importing transformers takes half a second, so not before the options are checked)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # (a failed hub request is the command's one-line error, not a log line too)


def _inspect_data(cfg: InspectConfig) -> None:
    from .data import inspect_data as _inspect
    from .models import config_position_limit, load_tokenizer

    _quiet_transformers()
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


def _options_from(cls):
    """Turn a config dataclass into a typer signature: one --option (or argument) per field, help and range from
    the field's metadata (see r2q.config.option)."""
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
            opt = typer.Option(help=f.metadata.get("help", ""), show_default=shown)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[typ, opt]))
    return inspect.Signature(params)


def _config_param(record: bool) -> inspect.Parameter:
    """--config; record: the command's options are train's, so a run's r2q_config.json is a config file too."""
    help = ("A YAML or JSON file of options (keys are option names, e.g. max_length: 512); options given on the "
            "command line override it" + (". A run's r2q_config.json is one" if record else ""))
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default="",
                             annotation=Annotated[str, typer.Option(help=help, show_default=False)])


def _config_command(name: str, cls, doc: str, run, extra: list | None = None) -> None:
    """A command whose options are the fields of config dataclass `cls` (plus `extra` parameters, handed to
    `run` by name, and --config): `run(cls(**fields), **extra)`, fields from --config where the command line
    leaves them at their default."""
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
                                              list(_options_from(cls).parameters.values()))
    command.__doc__ = doc
    app.command(name)(command)


def _train(cfg, name: str, mode: str) -> None:
    for req in ("model", "data", "out"):
        if not getattr(cfg, req):
            raise UserError(f"--{req} is required")
    _quiet_transformers()
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
                "chosen).", lambda cfg: _train(cfg, "sft", "sft"))


def _read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per line; blank lines are skipped, and said) or data with a `prompt` field
    (strings or messages): a data file, or a data set directory."""
    from .data import read_rows, read_text

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".txt" and path.is_file():
        lines = read_text(path).splitlines()
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise UserError(f"{path}: no prompts")
        if len(prompts) < len(lines):
            blank = len(lines) - len(prompts)
            note(f"{path}: {blank} blank line{'s' * (blank != 1)} skipped; {len(prompts)} prompts, one output line "
                 "each")
        return prompts
    prompts = []
    for n, row in read_rows(path):
        if "prompt" not in row:
            raise UserError(f"{path} row {n}: no 'prompt' field (its fields: {', '.join(map(str, row)) or 'none'})")
        p = row["prompt"]
        if not isinstance(p, (str, list)):  # a list of messages is checked, and rendered, by the search
            raise UserError(f"{path} row {n}: field 'prompt' must be a string or a list of chat messages")
        prompts.append(p)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _generate_command() -> None:
    def command(cfg: GenerateConfig, model: str, prompts: Path, out_path: Path, ref: str, base: str, dtype: str,
                attn_implementation: str, quiet: bool, trust_remote_code: bool) -> None:
        check_models(cfg, ref or None, base or None)  # before loading: it asks only whether each model is given
        if attn_implementation not in ATTENTION:
            raise UserError(f"--attn-implementation must be one of {', '.join(a or repr(a) for a in ATTENTION)}; "
                            f"got {attn_implementation!r}")
        check_attention(attn_implementation)
        check_out_file(out_path, "--out")
        check_outputs_spare_inputs([("--out", out_path)], files=[("--prompts", prompts)],
                                   dirs=[("--model", model), ("--ref", ref), ("--base", base)])
        texts = _read_prompts(prompts)
        _quiet_transformers()
        from .models import check_model_path, check_vocab, load_model, load_reference, load_tokenizer
        for path, what in ((model, "model"), (ref, "reference"), (base, "base")):  # all, before any is loaded
            if path:
                check_model_path(path, what)
        from .search import generate
        from .shards import processes

        procs = processes()  # under torchrun / accelerate launch: every process decodes its share of the batches
        tok = load_tokenizer(model, trust_remote_code)
        policy = load_model(model, dtype, trust_remote_code, attn_implementation)
        check_vocab(tok, policy)
        if ref and (changed := reference_changed(_record_if_readable(model), ref)) is not None:
            note(changed)
        others = {name: load_reference(path, tok, policy, dtype, trust_remote_code, name, attn_implementation)
                  for name, path in (("reference", ref), ("base", base)) if path}
        results, total = generate(policy, tok, texts, cfg, ref=others.get("reference"), base=others.get("base"),
                                  progress=not quiet, procs=procs)
        if procs.is_main:  # one output file, from the first process
            write_atomic(out_path, "".join(json.dumps(dict(r.as_dict(), method=cfg.method)) + "\n" for r in results))
            out.print(f"{len(results)} generations written to {out_path}; compute: "
                      + ", ".join(f"{k} {v}" for k, v in total.items()), highlight=False, markup=False)
        procs.finish()

    base_params = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[str, typer.Option(help="Policy model directory")]),
        inspect.Parameter("prompts", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option(help="Prompts: .txt (one per line) or a data file "
                                                                  "with a 'prompt' field")]),
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
                          annotation=Annotated[bool, typer.Option(help="Allow model code from the checkpoint")]),
    ]
    _config_command("generate", GenerateConfig, "Decode with search over the policy: beam, reward-beam, best-of-n, "
                    "chunk-beam, mcts, ...", command, base_params)


_generate_command()


def _record_if_readable(model: str):
    """The model's run record for a note, or None where it is damaged (generate needs nothing else from it)."""
    try:
        return read_record(model)
    except UserError:
        return None


def _credit_inputs(cfg) -> tuple[str, float]:
    """credit's options checked before anything loads; returns the reference and beta, defaulting to what
    `r2q train` recorded with the model (and noting when that reference has changed since), else beta 0.1."""
    if not cfg.model:
        raise UserError("--model is required")
    texts = cfg.prompt is not None or cfg.response is not None
    if bool(cfg.data) == texts:
        raise UserError("give either --data FILE or --prompt TEXT with --response TEXT")
    if texts and (cfg.prompt is None or cfg.response is None):
        raise UserError(f"{'--response' if cfg.prompt is None else '--prompt'} is given without "
                        f"{'--prompt' if cfg.prompt is None else '--response'}: they go together")
    try:
        rec = read_record(cfg.model)
    except UserError as e:  # a damaged record: what it would have given was given on the command line
        if not (cfg.ref and cfg.beta is not None):
            raise
        note(f"{e} (doing so)")
        rec = None
    ref = cfg.ref or (rec.reference() if rec else "")
    if not ref:
        raise UserError("--ref is required (the model has no r2q_config.json naming its reference)")
    outputs = [(flag_name, path) for flag_name, path in (("--html", cfg.html), ("--json", cfg.json),
                                                          ("--png", cfg.png)) if path]
    for flag_name, path in outputs:
        check_out_file(path, flag_name)
    check_outputs_spare_inputs(outputs, files=[("--data", cfg.data)],
                               dirs=[("--model", cfg.model), ("--ref", "" if ref == "none" else ref)])
    if (changed := reference_changed(rec, ref)) is not None:
        note(changed)
    return ref, cfg.beta if cfg.beta is not None else (rec.beta() if rec else None) or 0.1


def _write_credit(report, cfg, console: Console) -> None:
    from .views.html import write_html
    from .views.plots import plot_credit

    written = []
    if cfg.json:
        written.append(report.to_json(cfg.json))
    if cfg.html:
        written.append(write_html(report, cfg.html))
    if cfg.png:
        written.append(plot_credit(report, cfg.png))
    for p in written:
        console.print(f"wrote {p}", highlight=False, markup=False)


def run_credit(cfg, console: Console | None = None) -> dict:
    """`r2q credit`: check, load, score, print the terminal view, write the requested files; returns the JSON
    dict. --ref / --beta default to what `r2q train` recorded with the model, else beta 0.1."""
    console = console or Console()
    ref, beta = _credit_inputs(cfg)
    _quiet_transformers()
    import torch

    from .credit import credit_from_file, score_texts
    from .models import check_vocab, load_model, load_reference, load_tokenizer
    from .views.terminal import render_terminal

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    policy = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code, cfg.attn_implementation)
    check_vocab(tokenizer, policy)
    ref_model = None if ref == "none" else load_reference(ref, tokenizer, policy, cfg.dtype, cfg.trust_remote_code,
                                                          attn=cfg.attn_implementation)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m in (policy, ref_model):
        if m is not None:
            m.to(device)
    from .shards import processes

    procs = processes()  # under torchrun / accelerate launch: every process scores its share of the batches
    kw = dict(procs=procs, delimiter=cfg.delimiter, batch_size=cfg.batch_size, share_prefix=cfg.share_prefix,
              cache_dir=cfg.cache_dir or None, progress=not cfg.quiet, top_k=cfg.top_k,
              min_count=cfg.min_count or None, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    if cfg.data:
        report = credit_from_file(policy, ref_model, tokenizer, cfg.data, beta, skip_bad=cfg.skip_bad,
                                  split=cfg.split, subset=cfg.subset, **kw)
    else:
        report = score_texts(policy, ref_model, tokenizer, [cfg.prompt], [cfg.response], beta, **kw)
    for line in report.data.notes() if procs.is_main and report.data is not None else ():
        note(line)  # rows skipped, prompts or completions cut to --max-prompt-length / --max-length
    report.meta.update(model=str(cfg.model), ref=str(ref), data=report.meta.get("data", "--prompt/--response"))
    if procs.is_main:  # one view and one set of files, from the first process
        render_terminal(report, console, max_items=cfg.show)
        _write_credit(report, cfg, console)
    procs.finish()
    return report.to_dict()


def _theory(cfg: TheoryConfig) -> None:
    _quiet_transformers()
    from .theory import run as run_theory

    summary = run_theory(cfg.out, seed=cfg.seed, quick=cfg.quick, progress=not cfg.quiet)
    if not summary["passed"]:
        raise UserError(f"some theory checks failed; see {Path(cfg.out) / 'report.html'}")


def _demo(cfg: DemoConfig) -> None:
    _quiet_transformers()
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

"""The `r2q` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Token-level DPO: train a policy, see which tokens it rewards, and search over it.",
)
out = Console()


@app.command()
def version() -> None:
    """Print the r2q version."""
    out.print(f"r2q {__version__}")


@app.command("inspect-data")
def inspect_data(
    data: Annotated[Path, typer.Argument(help="Preference or SFT data (.jsonl, .json, .parquet, .csv, dataset dir)")],
    model: Annotated[str, typer.Option(help="Model (or tokenizer) directory whose tokenizer to use")],
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt + completion")] = 1024,
    max_prompt_length: Annotated[int, typer.Option(help="Max prompt tokens (cut from the left)")] = 512,
) -> None:
    """Counts, token length percentiles, truncation and bad rows of a data file."""
    from .data import inspect_data as _inspect
    from .models import load_tokenizer

    info = _inspect(data, load_tokenizer(model), max_length=max_length, max_prompt_length=max_prompt_length)
    table = Table(title=f"{data} ({info['kind']}, {info['format']})")
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
    for msg in info["skipped_rows"]:
        out.print(f"  skipped: {msg}", markup=False, highlight=False)


def _options_from(cls):
    """Turn a config dataclass into a typer signature: one --option per field, help from field metadata."""
    import dataclasses
    import inspect

    params = []
    for f in dataclasses.fields(cls):
        name = f.type if isinstance(f.type, str) else f.type.__name__
        typ = {"int": int, "float": float, "str": str, "bool": bool}[name]
        opt = typer.Option(help=f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=Annotated[typ, opt]))
    return inspect.Signature(params)


def _train_command(name: str, mode: str, doc: str) -> None:
    from .train import TrainConfig

    def command(**kw) -> None:
        from .train import train

        cfg = TrainConfig(**kw)
        for req in ("model", "data", "out"):
            if not getattr(cfg, req):
                raise UserError(f"--{req} is required")
        res = train(cfg, mode=mode)
        final = {k: v for k, v in (res.metrics[-1] if res.metrics else {}).items() if isinstance(v, float)}
        out.print(f"{name}: {res.steps} steps, model saved to {res.out}")
        if final:
            out.print("  ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:8]), highlight=False)

    command.__signature__ = _options_from(TrainConfig)
    command.__doc__ = doc
    app.command(name)(command)


_train_command("train", "dpo", "Token-level DPO training of a causal LM on preference pairs.")
_train_command("sft", "sft", "Supervised fine-tuning on completions (prompt/completion, text, messages or chosen).")


def _read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per line) or a data file with a `prompt` field (strings or messages)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".txt":
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"{path}: no prompts")
        return lines
    from .data import read_rows

    prompts = []
    for n, row in read_rows(path):
        p = row.get("prompt")
        if not isinstance(p, str):
            raise UserError(f"{path} row {n}: field 'prompt' must be a string")
        prompts.append(p)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _generate_command() -> None:
    import dataclasses
    import inspect

    from .search import GenerateConfig

    def command(model: str, prompts: Path, out_path: Path, ref: str, base: str, dtype: str, quiet: bool,
                trust_remote_code: bool, **kw) -> None:
        import json

        from .models import check_same_tokenizer, load_model, load_tokenizer
        from .search import generate

        cfg = GenerateConfig(**kw)
        texts = _read_prompts(prompts)
        tok = load_tokenizer(model, trust_remote_code)
        policy = load_model(model, dtype, trust_remote_code)
        others = {}
        for name, path in (("reference", ref), ("base", base)):
            if path:
                if (Path(path) / "tokenizer_config.json").exists():
                    check_same_tokenizer(tok, load_tokenizer(path), f"policy and {name}")
                others[name] = load_model(path, dtype, trust_remote_code)
        results, total = generate(policy, tok, texts, cfg, ref=others.get("reference"), base=others.get("base"),
                                  progress=not quiet)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        with open(tmp, "w") as f:
            for r in results:
                f.write(json.dumps(dict(r.as_dict(), method=cfg.method)) + "\n")
        tmp.replace(out_path)
        out.print(f"{len(results)} generations written to {out_path}; compute: "
                  + ", ".join(f"{k} {v}" for k, v in total.items()), highlight=False)

    base_params = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[str, typer.Option(help="Policy model directory")]),
        inspect.Parameter("prompts", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option(help="Prompts: .txt (one per line) or a data file "
                                                                  "with a 'prompt' field")]),
        inspect.Parameter("out_path", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option("--out", help="Output .jsonl, one line per prompt")]),
        inspect.Parameter("ref", inspect.Parameter.KEYWORD_ONLY, default="",
                          annotation=Annotated[str, typer.Option(help="Reference model (implicit rewards, "
                                                                 "reward-beam, chunk-beam's untuned scorer)")]),
        inspect.Parameter("base", inspect.Parameter.KEYWORD_ONLY, default="",
                          annotation=Annotated[str, typer.Option(help="chunk-beam proposer (default: the reference)")]),
        inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default="fp32",
                          annotation=Annotated[str, typer.Option(help="fp32, bf16 or fp16 weights")]),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(help="No progress bar")]),
        inspect.Parameter("trust_remote_code", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(help="Allow model code from the checkpoint")]),
    ]
    assert not {p.name for p in base_params} & {f.name for f in dataclasses.fields(GenerateConfig)}
    command.__signature__ = inspect.Signature(base_params + list(_options_from(GenerateConfig).parameters.values()))
    command.__doc__ = "Decode with search over the policy: beam, reward-beam, best-of-n, chunk-beam, mcts, ..."
    app.command("generate")(command)


_generate_command()


@app.command()
def credit(
    model: Annotated[str, typer.Option(help="Policy (DPO) model directory")],
    ref: Annotated[str, typer.Option(help="Reference model; default: the one r2q train recorded; 'none' = "
                                          "reference-free")] = "",
    beta: Annotated[float, typer.Option(help="beta; default: the one r2q train recorded, else 0.1")] = 0.0,
    data: Annotated[str, typer.Option(help="Pairs (prompt/chosen/rejected) or completions to score")] = "",
    prompt: Annotated[str, typer.Option(help="A prompt (with --response), instead of --data")] = "",
    response: Annotated[str, typer.Option(help="The response to --prompt")] = "",
    html: Annotated[str, typer.Option(help="Write a self-contained HTML heatmap here")] = "",
    json_path: Annotated[str, typer.Option("--json", help="Write the per-token numbers as JSON here")] = "",
    png: Annotated[str, typer.Option(help="Write a PNG figure here")] = "",
    delimiter: Annotated[str, typer.Option(help="Step delimiter for per-step sums")] = "\n",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward")] = 16,
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt + completion")] = 1024,
    max_prompt_length: Annotated[int, typer.Option(help="Max prompt tokens (cut from the left)")] = 512,
    cache_dir: Annotated[str, typer.Option(help="Reference log-prob cache (as r2q train --cache-dir)")] = "",
    share_prefix: Annotated[bool, typer.Option(help="Run each pair's prompt once")] = True,
    show: Annotated[int, typer.Option(help="Items shown in the terminal")] = 5,
    skip_bad: Annotated[bool, typer.Option(help="Skip malformed rows instead of stopping")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the checkpoint")] = False,
) -> None:
    """Per-token implicit rewards beta*log pi/pi_ref: terminal heatmap, HTML, PNG and JSON."""
    from .credit import run_credit

    run_credit(model, ref or None, beta or None, data or None, prompt or None, response or None, html or None,
               json_path or None, png or None, delimiter=delimiter, batch_size=batch_size, max_length=max_length,
               max_prompt_length=max_prompt_length, cache_dir=cache_dir or None, quiet=quiet,
               share_prefix=share_prefix, show=show, skip_bad=skip_bad, trust_remote_code=trust_remote_code)


@app.command()
def theory(
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory")] = Path("r2q-theory"),
    seed: Annotated[int, typer.Option(help="Seed of the MDP instance and the sampled data")] = 0,
    quick: Annotated[bool, typer.Option(help="Smaller checks (about half a minute)")] = False,
    quiet: Annotated[bool, typer.Option(help="No tables while running")] = False,
) -> None:
    """Exact checks of the paper's identities on a token-level MDP where Q* is known."""
    from .theory import run

    summary = run(out_dir, seed=seed, quick=quick, progress=not quiet)
    if not summary["passed"]:
        raise UserError(f"some theory checks failed; see {out_dir / 'report.html'}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory (stages cached here)")] = Path("r2q-demo"),
    profile: Annotated[str, typer.Option(help="quick (minutes on a laptop CPU) or full (better fidelity)")] = "quick",
    seed: Annotated[int, typer.Option(help="Seed of every stage")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars inside stages")] = False,
) -> None:
    """The paper's three findings on the built-in imdb-sentiment task, from scratch, with a report."""
    from .demo import DemoConfig, run

    run(DemoConfig(out=str(out_dir), profile=profile, seed=seed, quiet=quiet))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        app(args=argv, prog_name="r2q")
    except UserError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

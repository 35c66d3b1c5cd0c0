"""The dependency contract: a core of formulas and plumbing, the commands' libraries over it, the views over those,
and the command line and demo on top. Imports only point down (or sideways within a layer) and never form a
circle. Function-level imports count too: a lazy import is still a dependency."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    # 0. core: the paper's formulas (tokens, rewards, losses), data, models and plumbing
    ("r2q", "r2q.errors", "r2q.config", "r2q.paths", "r2q.progress", "r2q.stats", "r2q.tokens", "r2q.rewards",
     "r2q.losses", "r2q.data", "r2q.models", "r2q.refcache", "r2q.checkpoint", "r2q.record", "r2q.reference",
     "r2q.prepare", "r2q.shards", "r2q.lazy"),
    # 1. what the commands compute: training, credit, search, the tasks, the theory's checks
    ("r2q.train", "r2q.credit", "r2q.credit_config", "r2q.search", "r2q.tasks", "r2q.toy", "r2q.theory.mdp",
     "r2q.theory.dpo", "r2q.theory.neural", "r2q.theory.checks"),
    # 2. views of results
    ("r2q.views",),
    # 3. the command line, the demo and the theory report
    ("r2q.cli", "r2q.commands", "r2q.clidoc", "r2q.demo", "r2q.theory.report", "r2q.theory", "r2q.integrations"),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "r2q").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def layer(name: str) -> int:
    """The layer of a module: the longest prefix listed (r2q.search.beam is in r2q.search's layer)."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """r2q modules that `name` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("r2q"):
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("r2q")}
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_import_points_down_or_sideways():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, deps in graph().items()
             for b in deps if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m.startswith("r2q.") and m.rsplit(".", 1)[0] == n:
                continue  # a package importing its own submodules is how packages are assembled
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_the_reward_formula_has_one_definition():
    """beta * (log pi - log pi_ref) is written once, in r2q.rewards.token_rewards; everything else calls it."""
    hits = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)
                    and isinstance(node.right, ast.BinOp) and isinstance(node.right.op, ast.Sub)
                    and "beta" in ast.unparse(node.left)):
                hits.append(f"{name}: {ast.unparse(node)}")
    assert hits == ["r2q.rewards: beta * (policy_logps - ref_logps)"], hits


def test_rooms_stay_readable():
    """Sizes that keep a module readable in one sitting: no module over 450 lines, no function over 60 (beam_search,
    which mirrors transformers' step for step, may take 90), and the trainer's __init__ a short list of calls."""
    limits = {"beam_search": 90}
    too_long = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        if (n := len(path.read_text().splitlines())) > 450:
            too_long.append(f"{name}: {n} lines")
        for cls in [None, *[c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)]]:
            body = tree.body if cls is None else cls.body
            for fn in (f for f in ast.walk(ast.Module(body=body, type_ignores=[]))
                       if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))):
                length = fn.end_lineno - fn.lineno + 1
                limit = 40 if (cls is not None and cls.name == "Trainer" and fn.name == "__init__") \
                    else limits.get(fn.name, 60)
                if length > limit:
                    too_long.append(f"{name}.{fn.name}: {length} lines (limit {limit})")
    assert not too_long, too_long

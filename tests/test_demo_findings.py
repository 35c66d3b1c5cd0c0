"""The demo's machinery on constructed inputs and tiny models: verdicts from intervals across seeds (untestable
included), the edit test against a direct computation and its pairing, the cross-fitted best width, and stage
cache keys that change with the code they run."""

import json

import numpy as np
import pytest
import torch

from r2q.demo.claims import Claim, Untestable, crossfit_best_minus, seed_status, verdict
from r2q.demo.credit import Edit, _EditSet, _paired, _Scored, edit_measures, make_edits
from r2q.demo.stages import Stage, Stages, source_files, source_hash
from r2q.stats import mean_ci


@pytest.mark.parametrize("interval, direction, threshold, want", [
    ((0.3, 0.1, 0.5), "above", 0.0, "supports"),
    ((0.3, -0.1, 0.5), "above", 0.0, "inconclusive"),  # straddles: the point estimate alone does not decide
    ((-0.3, -0.5, -0.1), "above", 0.0, "contradicts"),
    ((-0.3, -0.5, -0.1), "below", 0.0, "supports"),
    ((0.6, 0.5, 0.68), "below", 0.693, "supports"),
    ((0.7, 0.65, 0.75), "below", 0.693, "inconclusive"),
    ((3.0, 2.0, 4.0), "within", (1.0, 8.0), "supports"),
    ((8.5, 7.5, 9.5), "within", (1.0, 8.0), "inconclusive"),
    ((12.0, 10.0, 14.0), "within", (1.0, 8.0), "contradicts"),
    ((0.3, float("nan"), float("nan")), "above", 0.0, "inconclusive"),
])
def test_a_seed_decides_a_claim_by_its_interval_not_its_estimate(interval, direction, threshold, want):
    assert seed_status(interval, threshold, direction) == want


@pytest.mark.parametrize("statuses, want", [
    (["supports"] * 3, "holds"),
    (["contradicts"] * 3, "fails"),
    (["inconclusive"] * 3, "inconclusive"),
    (["supports", "supports", "inconclusive"], "mixed"),
    (["supports", "contradicts", "supports"], "mixed"),
    (["supports", "untestable", "supports"], "untestable"),
])
def test_verdict_across_seeds(statuses, want):
    assert verdict(statuses) == want


def test_a_claim_is_tested_in_every_seed_and_says_why_it_is_untestable():
    def get(res, shared):
        if res["eos"] < 0.8:
            return Untestable(f"only {res['eos']:.0%} end by EOS")
        return res["x"]

    c = Claim("x", "2 search", "longer outputs", "length diff", 0.0, "above", get)
    seeds = {"0": {"x": (1.0, 0.5, 1.5), "eos": 0.9}, "1": {"x": (0.2, -0.1, 0.5), "eos": 0.95}}
    out = c.test(seeds, {})
    assert out["verdict"] == "mixed" and out["range"] == [0.2, 1.0]
    assert out["per_seed"]["0"] == {"estimate": 1.0, "ci95": [0.5, 1.5], "status": "supports"}
    assert out["per_seed"]["1"]["status"] == "inconclusive"
    seeds["2"] = {"x": (1.0, 0.5, 1.5), "eos": 0.3}
    out = c.test(seeds, {})
    assert out["verdict"] == "untestable" and out["reason"] == "seed 2: only 30% end by EOS"
    assert json.loads(json.dumps(out))["per_seed"]["2"] == {"status": "untestable", "reason": "only 30% end by EOS"}


def test_crossfit_best_width_is_chosen_on_the_other_half():
    rng = np.random.default_rng(0)
    n = 40
    arms = {k: rng.normal(size=n) for k in (0, 2, 4, 16)}
    arms[4] += 1.0  # the best width
    got = crossfit_best_minus(arms, 16, n_boot=200)
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    best_even = max(arms, key=lambda k: arms[k][even].mean())  # chosen on even prompts, measured on odd ones
    best_odd = max(arms, key=lambda k: arms[k][odd].mean())
    diff = np.zeros(n)
    diff[odd] = arms[best_even][odd] - arms[16][odd]
    diff[even] = arms[best_odd][even] - arms[16][even]
    assert got[0] == pytest.approx(diff.mean())
    assert got[1] <= got[0] <= got[2]
    # the best among the candidates only: here the target itself is never chosen
    only = crossfit_best_minus(arms, 0, n_boot=50, candidates=[2, 16])
    want = np.zeros(n)
    want[odd] = arms[max((2, 16), key=lambda k: arms[k][even].mean())][odd] - arms[0][odd]
    want[even] = arms[max((2, 16), key=lambda k: arms[k][odd].mean())][even] - arms[0][even]
    assert only[0] == pytest.approx(want.mean())
    # no width better than the target: no selection bias pushes the estimate above 0 on average
    null = [crossfit_best_minus({k: np.random.default_rng(s).normal(size=n) for k in (0, 2, 4, 16)}, 16, 20)[0]
            for s in range(200)]
    assert abs(np.mean(null)) < 0.05


def test_make_edits_swap_the_first_sentiment_and_placebo_token():
    swaps = [(10, 20, 2.0, -2.0), (11, 21, 1.5, -1.5)]
    placebo = [(30, 31, 0.01, -0.02)]
    edits = make_edits([([1, 2], [5, 11, 7, 10, 21, 31]), ([3], [6, 7])], swaps, placebo)
    got = [(e.t, e.direction, e.kind, e.edited) for e in edits]
    assert got == [
        (1, -1, "sentiment", (5, 21, 7, 10, 21, 31)),  # first positive token (11 at t=1) -> its negative partner
        (4, 1, "sentiment", (5, 11, 7, 10, 11, 31)),  # first negative token (21 at t=4) -> its positive partner
        (5, 1, "placebo", (5, 11, 7, 10, 21, 30)),  # 31 -> 30: the gold weight rises (+0.03)
    ]
    assert all(e.source == 0 and e.orig == (5, 11, 7, 10, 21, 31) and e.prompt == (1, 2) for e in edits)


def _token_rewards(model, ref, prompt, comp, beta):
    """beta * (log pi - log pi_ref) of each completion token, straight from the models' logits."""
    ids = torch.tensor([list(prompt) + list(comp)])
    out = []
    for m in (model, ref):
        logits = m(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        out.append(logits[torch.arange(len(comp)), torch.tensor(list(comp))])
    return (beta * (out[0] - out[1])).numpy()


def test_edit_measures_match_a_direct_computation(llama_dir, llama_ref_dir, tokenizer):
    from r2q.models import load_model

    pol, ref = load_model(llama_dir).eval(), load_model(llama_ref_dir).eval()
    g = torch.Generator().manual_seed(0)
    sources = [([int(x) for x in torch.randint(3, 300, (3,), generator=g)],
                [int(x) for x in torch.randint(3, 300, (12,), generator=g)]) for _ in range(12)]
    pool = sorted({t for _, c in sources for t in c})
    swaps = [(pool[i], pool[-1 - i], 1.0, -1.0) for i in range(6)]
    placebo = [(pool[10], pool[11], 0.1, 0.2)]
    edits = make_edits(sources, swaps, placebo)
    assert len(edits) >= 6 and {e.kind for e in edits} == {"sentiment", "placebo"}
    got = edit_measures(pol, ref, tokenizer, edits, 0.1)
    with torch.no_grad():
        for i, e in enumerate(edits):
            r1 = _token_rewards(pol, ref, e.prompt, e.edited, 0.1)
            d = r1 - _token_rewards(pol, ref, e.prompt, e.orig, 0.1)
            assert np.abs(d[: e.t]).max(initial=0.0) < 1e-5  # same prefix, same rewards
            if e.kind == "placebo":
                hit = np.argmax(np.abs(d)) == e.t
            else:
                hit = (np.argmax(d) if e.direction > 0 else np.argmin(d)) == e.t
            assert got["hit"][i] == float(hit)
            assert got["signed"][i] == pytest.approx(e.direction * d[e.t], abs=1e-5)
            assert got["sum_delta"][i] == pytest.approx(d.sum(), abs=1e-4)
            assert got["picture"][i] == float((np.argmax(r1) if e.direction > 0 else np.argmin(r1)) == e.t)
            assert got["chance"][i] == pytest.approx(1 / len(e.edited))


def test_edit_comparisons_are_paired_per_edit_and_resample_source_texts():
    class Gold:
        def __call__(self, texts):
            return np.array([float(len(t)) for t in texts])

    class Tok:
        def decode(self, ids):
            return "x" * len(ids)

    # six sources with two sentiment edits each and one placebo edit each
    edits = [Edit(s, (1,), (2, 3), (2, 4) if k < 2 else (2, 3, 5), 1, 1, "sentiment" if k < 2 else "placebo")
             for s in range(6) for k in range(3)]
    es = _EditSet(edits, Tok(), Gold(), n_boot=300)
    rng = np.random.default_rng(1)
    n = len(edits)

    def scored(shift):
        sd = rng.normal(size=n)
        return _Scored([0.0, 1.0, 2.0], {"signed": rng.normal(size=n) + shift, "hit": (rng.random(n) < 0.5) * 1.0,
                                         "sum_delta": sd, "picture": np.zeros(n), "chance": np.ones(n)})

    sc = {"dpo-b": scored(1.0), "untrained": scored(0.0), "shuffled": scored(0.0), "sft-chosen": scored(0.2)}
    got = _paired(sc, "dpo-b", [0.0, 1.0, 2.0], [0, 1, 2], es)
    sent = es.sent
    per_edit = sc["dpo-b"].edits["signed"][sent] - sc["sft-chosen"].edits["signed"][sent]
    est, lo, hi = got["signed_minus_null"]["sft-chosen"]
    assert est == pytest.approx(per_edit.mean())  # a mean of per-edit differences: the pairing
    # the interval resamples the six sources, not the twelve edits: it matches a bootstrap over source means
    by_source = np.array([per_edit[es.src[sent] == s].mean() for s in range(6)])
    _, lo_s, hi_s = mean_ci(by_source, 300)
    assert (lo, hi) == pytest.approx((lo_s, hi_s), abs=1e-12)
    best_null = max(sc[k].edits["signed"][sent].mean() for k in ("untrained", "shuffled", "sft-chosen"))
    assert got["signed_minus_best_null"][0] == pytest.approx(sc["dpo-b"].edits["signed"][sent].mean() - best_null)
    hit = sc["dpo-b"].edits["hit"]
    assert got["hit_minus_placebo_false_hit"][0] == pytest.approx(hit[sent].mean() - hit[es.calm].mean())


def _package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n\ndef g():\n    from .sub import c  # inside a function\n")
    (pkg / "b.py").write_text("import json\n\ndef f():\n    return 1\n")
    (pkg / "sub" / "c.py").write_text("from ..b import f\n")
    (pkg / "d.py").write_text("x = 1\n")
    return pkg


def test_source_hash_follows_the_code_a_stage_imports(tmp_path):
    pkg = _package(tmp_path)
    files = {str(p.relative_to(pkg)) for p in source_files("pkg.a", pkg)}
    assert files == {"a.py", "b.py", "sub/c.py"}  # not d.py
    h0 = source_hash("pkg.a", pkg)
    (pkg / "d.py").write_text("x = 2\n")  # code the stage does not run
    source_hash.cache_clear()
    assert source_hash("pkg.a", pkg) == h0
    (pkg / "sub" / "c.py").write_text("from ..b import f\nY = 2\n")  # code it runs, two imports away
    source_hash.cache_clear()
    assert source_hash("pkg.a", pkg) != h0
    source_hash.cache_clear()


def test_stage_key_changes_with_the_code_settings_and_seed(monkeypatch, tmp_path):
    import r2q.demo.stages as stages

    def fn(ctx, d):
        return {}

    def key(**kw):
        st = Stages(tmp_path, kw.get("settings", {"n": 1}), [Stage("a", fn), Stage("b", fn, ("a",), per_seed=True)])
        return st.key("b", kw.get("seed", 0))

    base = key()
    assert key() == base and key(seed=1) != base and key(settings={"n": 2}) != base
    real = stages.source_hash
    monkeypatch.setattr(stages, "source_hash", lambda m: real(m) + "edited")
    assert key() != base  # an edit to the stage's code (or to a stage it reads) recomputes it


def test_the_real_stages_hash_the_modules_they_run():
    names = {p.name for p in source_files("r2q.demo.lm")}
    assert {"lm.py", "loop.py", "setup.py", "models.py"} <= names  # the trainer is a package
    assert "report.py" not in names and "claims.py" not in names  # the report's code does not recompute SFT
    # an edit to search does not train the shared LMs again, nor one to the trainer or search make the text again
    assert not any(p.parent.name == "search" for p in source_files("r2q.demo.lm"))
    text = {f"{p.parent.name}/{p.name}" for p in source_files("r2q.demo.text")}
    assert "tasks/imdb_sentiment.py" in text and not any(n.split("/")[0] in ("search", "train") for n in text)
    # the search package's __init__ imports lazily: its stage still hashes the code that decodes
    searched = {p.name for p in source_files("r2q.demo.search")}
    assert {"decode.py", "methods.py", "beam.py", "mcts.py", "cache.py", "hypothesis.py"} <= searched


def test_an_edit_to_search_recomputes_only_the_stages_that_decode(tmp_path, monkeypatch):
    """The demo's real stages, keyed before and after an edit to one search file: the text, the gold reward and the
    shared LMs (minutes of training) keep their keys; the stages that sample or search are computed again."""
    import r2q.demo.stages as stages
    from r2q.demo.pipeline import stage_list
    from r2q.demo.profile import PROFILES

    def keys(edited: str | None) -> dict[str, str]:
        real_files = stages.source_files

        def hashed(module):  # the real hash, with `edited` (a file name) counted as changed
            names = [f"{p.parent.name}/{p.name}" for p in real_files(module)]
            return stages.hashlib.sha256(repr([n + ("*" if n == edited else "") for n in names]).encode()).hexdigest()

        monkeypatch.setattr(stages, "source_hash", hashed)
        st = Stages(tmp_path, {"n": 1}, stage_list(PROFILES["quick"]))
        return {name: st.key(name, 0) for name in st.order}

    before, after = keys(None), keys("search/beam.py")
    same = {n for n in before if before[n] == after[n]}
    assert {"data", "gold", "sft", "judge"} <= same
    assert not {"eos", "pairs", "search"} & same  # they decode with the search package
    trained = keys("train/loop.py")
    assert before["data"] == trained["data"] and before["gold"] == trained["gold"] and before["sft"] != trained["sft"]

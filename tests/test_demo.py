"""The demo pipeline at a tiny size: every stage runs through the real code paths, the report renders, the
claims are computed from the run's own numbers, step-0 points are measured, and a second run reuses every
stage. The directions the quick profile must show are asserted by benchmarks/demo_claims.py, not here: a tiny
model's findings are noise."""

import json
import re
import shutil
import subprocess
import time

import pytest

from r2q.demo import DemoConfig, run
from r2q.demo.pipeline import jsonable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    summary = run(DemoConfig(out=str(out), profile="tiny", quiet=True))
    return out, summary, time.perf_counter() - t0


def test_summary_has_every_finding_with_measured_points(demo_run):
    out, summary, _ = demo_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved["profile"] == "tiny"
    assert set(saved["credit"]["models"]) == {"dpo-a", "dpo-b", "untrained", "shuffled", "sft-chosen"}
    for m in saved["credit"]["models"].values():
        est, lo, hi = m["spearman"]
        assert lo <= est <= hi and m["tokens"] > 0
        assert all(t[2] >= 20 for t in m["top_positive"] + m["top_negative"])  # tokens seen 20+ times only
        assert m["edit_test"]["edits"] == saved["credit"]["edits"] > 0
    rows = saved["search"]["by_beta"]["0.1"]["rows"]
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["sample (1 beam)", "greedy"] and methods[-1] == "human continuation"
    assert {"beam 2 lp 0", "beam 2 lp 1", "beam 4 lp 0", "beam 4 lp 1"} <= set(methods)
    assert {"guided alpha 2", "mcts 4 sims (full rollouts)"} <= set(methods)
    ec = saved["search"]["equal_compute"]
    for r in rows[1:] + ec["rows"]:
        assert r["win_rate_vs_sample"][1] <= r["win_rate_vs_sample"][0] <= r["win_rate_vs_sample"][2]
        assert 0.0 <= r["eos_share"] <= 1.0 and r["judge_nll"][0] > 0
    # every method with a width at every budget, spending no more than the budget, wider at larger budgets
    assert {(r["family"], r["budget"]) for r in ec["rows"]} == {(m, b) for m in
                                                                ("best-of-n", "beam", "reward-beam", "chunk-beam",
                                                                 "mcts") for b in ec["budgets"]}
    for r in ec["rows"]:
        assert 0 < r["tokens_per_prompt"] <= r["budget"] and r["width"] >= 1
        assert r["gold_vs_greedy"][1] <= r["gold_vs_greedy"][0] <= r["gold_vs_greedy"][2]
    for m in ("best-of-n", "beam", "mcts"):
        w = [r["width"] for r in sorted((r for r in ec["rows"] if r["family"] == m), key=lambda r: r["budget"])]
        assert w == sorted(w) and w[-1] > w[0]
    for name in ("dpo-a", "dpo-b", "dpo-a-rt", "dpo-b-rt"):
        dyn = saved["dynamics"][name]
        # step 0 is measured before the first update, where the policy is the reference: 0 up to float noise
        # (the reference's log-probs come from the precomputed cache, batched differently)
        assert dyn["eval"][0]["step"] == 0 and abs(dyn["eval"][0]["rewards/margin"]) < 1e-5
        assert dyn["kl_curve"][0]["step"] == 0 and abs(dyn["kl_curve"][0]["expected_reward_under_ref"]) < 1e-5
        assert len(dyn["kl_curve"]) > 2 and dyn["eval"][-1]["step"] > 0


def test_claims_are_the_ones_the_numbers_give(demo_run):
    from r2q.demo.findings import claims

    out, summary, _ = demo_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(claims(saved)))
    for c in saved["claims"]:
        assert c["ci95"][0] <= c["estimate"] <= c["ci95"][1]
    loss = {c["statement"].split(":")[0]: c for c in saved["claims"] if c["statistic"] == "held-out loss"}
    for name, c in loss.items():
        assert c["estimate"] == saved["credit"]["heldout"][name]["loss"][0]
        assert c["holds"] == (c["estimate"] < 0.6931471805599453)


def test_second_run_reuses_every_stage_and_keeps_its_timings(demo_run):
    out, summary, first = demo_run
    t0 = time.perf_counter()
    again = run(DemoConfig(out=str(out), profile="tiny", quiet=True))
    assert set(again["reused_stages"]) == set(summary["timings"])
    assert again["timings"] == summary["timings"] and again["seconds_compute"] > 1.0
    same = [json.loads(json.dumps(x["search"], default=jsonable)) for x in (again, summary)]
    assert same[0] == same[1]
    assert time.perf_counter() - t0 < first / 2


def test_report_is_self_contained_and_renders(demo_run, tmp_path):
    out, _, _ = demo_run
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "<script" not in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    # tall enough for the whole page: the claims and setup tables come before the first figure
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,14000",
                    f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    import matplotlib.image as mpimg
    import numpy as np

    px = mpimg.imread(shot)[..., :3]
    inked = np.flatnonzero((px < 0.99).any(axis=(1, 2)))
    px = px[: inked[-1] + 1] if len(inked) else px  # the page, not the blank canvas below its end
    coloured = (px.max(-1) - px.min(-1)) > 0.25  # saturated pixels: plot lines, heatmap bars
    # the figures' plot lines and heatmap bars, counted in pixels (not as a share: the page grows with its tables)
    assert coloured.sum() > 20_000 and coloured.any(axis=1).sum() > 300, "the screenshot shows no figures"
    assert (px.mean(-1) < 0.5).mean() > 0.005, "the screenshot shows no text"
    assert np.isfinite(px).all()

"""The demo pipeline at a tiny size, two seeds: every stage runs through the real code paths, the report renders,
the claims are computed from the run's own numbers with a verdict across seeds, step-0 points are measured, a
second run reuses every stage, and a run with another seed set reuses the shared stages. The directions the quick
profile shows are measured by benchmarks/demo_claims.py, not asserted here: a tiny model's findings are noise."""

import json
import re
import shutil
import subprocess
import time

import pytest

from r2q.demo import DemoConfig, run
from r2q.demo.common import jsonable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    summary = run(DemoConfig(out=str(out), profile="tiny", quiet=True, workers=2))  # stages side by side
    return out, summary, time.perf_counter() - t0


def test_summary_has_every_finding_per_seed_with_measured_points(demo_run):
    out, summary, _ = demo_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved["profile"] == "tiny" and saved["seeds"] == [0, 1]
    assert saved["shared_stages"] == ["data", "gold", "judge", "sft", "eos"]
    assert set(saved["per_seed"]) == {"0", "1"}
    for res in saved["per_seed"].values():
        assert set(res["credit"]["models"]) == {"dpo-a", "dpo-b", "untrained", "shuffled", "sft-chosen"}
        for m in res["credit"]["models"].values():
            est, lo, hi = m["spearman"]
            assert lo <= est <= hi
            assert all(t[2] >= 20 for t in m["top_positive"] + m["top_negative"])  # tokens seen 20+ times only
        assert res["credit"]["edits"] > 0 and res["credit"]["placebo_edits"] > 0
        rows = res["search"]["by_beta"]["0.1"]["rows"]
        families = [r["method"]["family"] for r in rows]
        assert families[:3] == ["sample", "sample", "greedy"] and families[-1] == "human"
        beams = {(r["method"]["width"], r["method"]["length_penalty"]) for r in rows if r["method"]["family"] == "beam"}
        assert beams == {(2, 0.0), (4, 0.0), (2, 1.0), (4, 1.0)}
        for r in rows[3:]:
            g = r["vs_greedy"]["gold"]
            assert g[1] <= g[0] <= g[2] and 0.0 <= r["eos_share"] <= 1.0 and r["judge_nll"][0] > 0
            assert len(r["per_prompt"]["gold_once"]) == len(r["per_prompt"]["gold"]) == res["search"]["prompts"]
        ec = res["search"]["equal_compute"]
        assert [r["method"]["family"] for r in ec["rows"][:2]] == ["sample", "greedy"]  # the baselines, same prompts
        for r in ec["rows"][2:]:
            assert 0 < r["tokens_per_prompt"] <= r["method"]["budget"] and r["width_chosen"] >= 1
        assert {(r["method"]["family"], r["method"]["budget"]) for r in ec["rows"][2:]} == {
            (f, b) for f in ("best-of-n", "beam", "reward-beam", "chunk-beam", "mcts") for b in ec["budgets"]}
        for name in ("dpo-a", "dpo-b", "dpo-a-rt", "dpo-b-rt", "dpo-shuffled", "dpo-shuffled-rt"):
            dyn = res["dynamics"]["runs"][name]
            # step 0 is measured before the first update, where the policy is the reference: 0 up to float noise
            assert dyn["eval"][0]["step"] == 0 and abs(dyn["eval"][0]["rewards/margins"]) < 1e-5
            assert dyn["kl_curve"][0]["step"] == 0 and abs(dyn["kl_curve"][0]["expected_reward_under_ref"]) < 1e-5
            assert dyn["kl_curve"][-1]["step"] == res["dpo"][name]["steps"]
            assert dyn["last_quarter_steps"][-1] == res["dpo"][name]["steps"]
        assert res["dpo"]["dpo-b"]["lr"] == saved["settings"]["dpo_lrs"][0]
    assert 0 < saved["seconds_wall_stages"] <= saved["seconds_compute"] + 2  # two workers: less than the sum
    for key, prov in saved["provenance"].items():
        assert prov["commit"] and len(prov["code"]) == 16 and prov["seconds"] > 0, key
        # the machine it ran on: another CPU's kernels round differently, so a moved number can be traced
        assert prov["machine"]["cpu"] and prov["machine"]["kernels"] and prov["machine"]["threads"] >= 1, key


def test_claims_carry_per_seed_intervals_and_the_verdict_they_give(demo_run):
    from r2q.demo.claims import claims, seed_status, verdict

    out, summary, _ = demo_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(claims(saved)))
    for c in saved["claims"]:
        assert set(c["per_seed"]) == {"0", "1"}
        statuses = []
        for v in c["per_seed"].values():
            if v["status"] != "untestable":
                lo, hi = v["ci95"]
                assert lo <= v["estimate"] <= hi
                assert v["status"] == seed_status((v["estimate"], lo, hi), c["threshold"], c["direction"])
            statuses.append(v["status"])
        assert c["verdict"] == verdict(statuses)
    loss = next(c for c in saved["claims"] if c["id"] == "loss:dpo-b")
    assert loss["per_seed"]["0"]["estimate"] == saved["per_seed"]["0"]["dynamics"]["runs"]["dpo-b"]["final"]["loss"][0]


def test_second_run_reuses_every_stage_and_another_seed_reuses_the_shared_ones(demo_run, tmp_path):
    out, summary, first = demo_run
    t0 = time.perf_counter()
    again = run(DemoConfig(out=str(out), profile="tiny", quiet=True))
    assert len(again["reused_stages"]) == len(summary["provenance"])
    assert again["provenance"] == summary["provenance"] and again["seconds_compute"] > 1.0
    same = [json.loads(json.dumps(x["per_seed"], default=jsonable)) for x in (again, summary)]
    assert same[0] == same[1]
    assert time.perf_counter() - t0 < first / 2
    shutil.copytree(out, tmp_path / "copy")  # the report test reads the two-seed report in `out`
    one = run(DemoConfig(out=str(tmp_path / "copy"), profile="tiny", quiet=True, seeds="1", workers=1))
    assert set(one["reused_stages"]) >= {"data", "gold", "judge", "sft", "eos", "pairs (seed 1)", "search (seed 1)"}
    assert json.loads(json.dumps(one["per_seed"]["1"], default=jsonable)) == same[1]["1"]


def test_report_is_self_contained_and_renders(demo_run, tmp_path):
    out, _, _ = demo_run
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "<script" not in page
    assert "holds" in page or "fails" in page or "mixed" in page or "inconclusive" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    # tall enough for the whole page: the claims and setup tables come before the first figure
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,30000",
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


def test_demo_options_are_checked_before_anything_runs(tmp_path):
    from r2q.errors import UserError

    for bad, msg in (("0,x", "comma-separated integers"), ("1,1", "distinct"), ("-1", "distinct integers >= 0")):
        with pytest.raises(UserError, match=msg):
            DemoConfig(out=str(tmp_path), seeds=bad)
    with pytest.raises(UserError, match="--workers"):
        DemoConfig(out=str(tmp_path), workers=-1)
    assert not any(tmp_path.iterdir())

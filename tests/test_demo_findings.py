"""The demo's measurements on tiny models: the edit test against a direct computation, and claims that follow
from the numbers they quote."""

import math

import numpy as np
import pytest
import torch

from r2q.demo.findings import claims, edit_test, make_edits


def test_make_edits_swap_the_first_sentiment_token_each_way():
    swaps = [(10, 20, "good", "bad"), (11, 21, "great", "awful")]
    edits = make_edits([([1, 2], [5, 11, 7, 10, 21]), ([3], [6, 7])], swaps)
    assert [(e["t"], e["direction"], e["edited"]) for e in edits] == [
        (1, -1, [5, 21, 7, 10, 21]),  # first positive token (11 at t=1) -> its negative partner
        (4, 1, [5, 11, 7, 10, 11]),  # first negative token (21 at t=4) -> its positive partner
    ]
    assert all(e["orig"] == [5, 11, 7, 10, 21] and e["prompt"] == [1, 2] for e in edits)


def _token_rewards(model, ref, prompt, comp, beta):
    """beta * (log pi - log pi_ref) of each completion token, straight from the models' logits."""
    ids = torch.tensor([prompt + comp])
    out = []
    for m in (model, ref):
        logits = m(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        out.append(logits[torch.arange(len(comp)), torch.tensor(comp)])
    return (beta * (out[0] - out[1])).tolist()


def test_edit_test_matches_a_direct_computation(llama_dir, llama_ref_dir, tokenizer):
    from r2q.models import load_model

    pol, ref = load_model(llama_dir).eval(), load_model(llama_ref_dir).eval()
    g = torch.Generator().manual_seed(0)
    sources = [([int(x) for x in torch.randint(3, 300, (3,), generator=g)],
                [int(x) for x in torch.randint(3, 300, (12,), generator=g)]) for _ in range(12)]
    pool = sorted({t for _, c in sources for t in c})
    swaps = [(pool[i], pool[-1 - i], "p", "n") for i in range(6)]
    edits = make_edits(sources, swaps)
    assert len(edits) >= 6
    res = edit_test(pol, ref, tokenizer, edits, 0.1, n_boot=50)
    hits, at_edit = [], {-1: [], 1: []}
    with torch.no_grad():
        for e in edits:
            d = np.subtract(_token_rewards(pol, ref, e["prompt"], e["edited"], 0.1),
                            _token_rewards(pol, ref, e["prompt"], e["orig"], 0.1))
            assert np.abs(d[: e["t"]]).max(initial=0.0) < 1e-5  # same prefix, same rewards
            hits.append(float((np.argmax(d) if e["direction"] > 0 else np.argmin(d)) == e["t"]))
            at_edit[e["direction"]].append(d[e["t"]])
    assert res["edits"] == len(edits)
    assert res["hit_share"][0] == pytest.approx(np.mean(hits))
    assert res["pos_to_neg"]["mean_delta_at_edit"][0] == pytest.approx(np.mean(at_edit[-1]), abs=1e-5)
    assert res["neg_to_pos"]["mean_delta_at_edit"][0] == pytest.approx(np.mean(at_edit[1]), abs=1e-5)


def _ci(x):
    return (x, x - 0.1, x + 0.1)


def test_claims_hold_exactly_when_their_numbers_say_so():
    def run(loss, acc, chosen=-1.0):
        return {"loss": _ci(loss), "accuracy": _ci(acc), "chosen_reward": _ci(chosen), "rejected_reward": _ci(-2.0),
                "margin": _ci(1.0), "pairs": 100}

    heldout = {"dpo-a": run(0.6, 0.7), "dpo-b": run(0.7, 0.7), "dpo-shuffled": run(0.9, 0.4),
               "dpo-a-rt": run(0.5, 0.64), "dpo-b-rt": run(0.5, 0.8, chosen=0.5)}
    edit = {"edits": 10, "hit_share": _ci(0.5)}
    models = {k: {"spearman": _ci(v), "edit_test": dict(edit, hit_share=_ci(h))}
              for k, v, h in (("dpo-a", 0.5, 0.9), ("dpo-b", 0.25, 0.7), ("untrained", 0.05, 0.3),
                              ("shuffled", 0.0, 0.5), ("sft-chosen", 0.2, 0.6))}
    per = {"gold": [0.0] * 4, "length": [10.0] * 4}
    rows = [{"method": "sample (1 beam)", "per_prompt": per}]
    for k, g, n in ((4, 1.0, 10.0), (16, -1.0, 20.0)):
        rows.append({"method": f"beam {k} lp 0", "per_prompt": {"gold": [g] * 4, "length": [n] * 4},
                     "gold_vs_sample": _ci(g), "win_rate_vs_sample": _ci(0.6)})
    summary = {"credit": {"heldout": heldout, "models": models}, "settings": {
        "betas": (0.1,), "beams": (4, 16), "length_penalties": (0.0,), "n_boot": 50},
        "search": {"by_beta": {"0.1": {"rows": rows}}}}
    got = {c["statement"].split(":")[0] + " | " + c["statistic"]: c["holds"] for c in claims(summary)}
    assert got["dpo-a | held-out loss"] and not got["dpo-b | held-out loss"]  # 0.7 > ln 2
    assert not got["dpo-a-rt | held-out accuracy"] and got["dpo-b-rt | held-out accuracy"]
    assert not any(k.startswith("dpo-shuffled") and "held-out" in k for k in got)  # the null is not a claim
    assert got["dpo-a | Spearman"]  # 0.4 > highest null upper bound 0.3
    assert not got["dpo-b | Spearman"]  # 0.15 < 0.3
    assert got["dpo-a | hit share"] and not got["dpo-b | hit share"]
    c = next(c for c in claims(summary) if "longer outputs" in c["statement"])
    assert c["holds"] and c["estimate"] == pytest.approx(10.0)
    c = next(c for c in claims(summary) if "lower gold" in c["statement"])
    assert c["holds"] and c["estimate"] == pytest.approx(-2.0)
    b_rt = next(c for c in claims(summary) if c["statement"].startswith("dpo-b-rt (reference never"))
    assert b_rt["holds"] and b_rt["estimate"] == 0.5
    assert all(c["ci95"][0] <= c["estimate"] <= c["ci95"][1] for c in claims(summary))
    assert math.log(2) < 0.7

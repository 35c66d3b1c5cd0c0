"""credit and generate under 2 processes (torchrun, gloo on the CPU): each scores or decodes every other batch, and
the merged output is the one-process output, pair for pair and hypothesis for hypothesis, in input order."""

import json
import sys

import pytest
from conftest import free_port, pref_rows, run, single, torchrun, write_jsonl

from r2q.shards import Processes

SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from r2q.models import load_model, load_tokenizer
from r2q.search import GenerateConfig, generate
from r2q.shards import processes

model, ref, out = sys.argv[1:4]
tok, pol, rm = load_tokenizer(model), load_model(model), load_model(ref)
prompts = ["the film", "a", [{"role": "user", "content": "the plot"}], "it was", "acting", "so", "never again"]
res = {}
for method, kw in (("beam", dict(num_beams=3)), ("greedy", {}), ("reward-beam", dict(num_beams=2)),
                   ("mcts", dict(simulations=4, expand_top_k=3))):
    gens, total = generate(pol, tok, prompts, GenerateConfig(method=method, max_new_tokens=6, batch_size=2, **kw),
                           ref=rm, procs=processes())
    res[method] = [{k: v for k, v in g.as_dict().items() if k != "compute_wall_time_s"} for g in gens]
    res[method + " total"] = {k: v for k, v in total.items() if k != "wall_time_s"}
from r2q.credit import credit_from_file
report = credit_from_file(pol, rm, tok, sys.argv[4], 0.1, batch_size=2, procs=processes(), use_cache=False)
res["credit"] = report.to_dict()
if processes().is_main:
    open(out, "w").write(json.dumps(res))
"""


def test_processes_split_batches_round_robin_and_merge_in_order():
    p0, p1 = Processes(0, 2), Processes(1, 2)
    assert list(p0.mine(5)) == [0, 2, 4] and list(p1.mine(5)) == [1, 3] and not p1.is_main
    assert Processes().merge({1: "b", 0: "a"}) == {0: "a", 1: "b"}


@pytest.mark.slow
def test_two_processes_score_and_generate_what_one_does(llama_dir, llama_ref_dir, tmp_path):
    script, data = tmp_path / "job.py", write_jsonl(tmp_path / "pairs.jsonl", pref_rows(7, 3))
    script.write_text(SCRIPT)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = [str(llama_dir), str(llama_ref_dir)]
    run([sys.executable, str(script)], [*args, str(one), str(data)], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script)], [*args, str(two), str(data)], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(a["beam"]) == 7 and a["beam"][2]["prompt"][0]["role"] == "user"
    assert len(a["credit"]["pairs"]) == 7 and a["credit"]["summary"]
    assert a == b


def test_sampling_methods_are_refused_across_processes(monkeypatch, tokenizer):
    from conftest import sharp_model

    import r2q.search.decode as decode
    from r2q.errors import UserError
    from r2q.search import GenerateConfig

    pol = sharp_model("llama", seed=1, vocab=len(tokenizer))
    with pytest.raises(UserError, match="cannot be split across processes"):
        decode.generate(pol, tokenizer, ["a"], GenerateConfig(method="sample", max_new_tokens=2),
                        procs=Processes(0, 2))


@pytest.mark.slow
def test_the_commands_under_torchrun_write_what_one_process_writes(llama_dir, llama_ref_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(5, 4))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the film"}, {"prompt": "a"},
                                                       {"prompt": [{"role": "user", "content": "so"}]}])
    for name, launcher in (("one", single()), ("two", torchrun(2))):
        run(launcher, ["generate", "--model", str(llama_dir), "--ref", str(llama_ref_dir), "--prompts", str(prompts),
                       "--out", str(tmp_path / f"{name}.jsonl"), "--max-new-tokens", "5", "--batch-size", "1",
                       "--quiet"], tmp_path)
        run(launcher, ["credit", "--model", str(llama_dir), "--ref", str(llama_ref_dir), "--data", str(data),
                       "--batch-size", "2", "--json", str(tmp_path / f"{name}.json"), "--quiet"], tmp_path)

    def lines(name):
        return [{k: v for k, v in json.loads(x).items() if k != "compute_wall_time_s"}
                for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    assert len(lines("one")) == 3 and lines("one") == lines("two")
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())

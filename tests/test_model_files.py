"""Damaged model directories: a sharded index transformers cannot read, weights of other shapes than config.json
says. Each is one line naming the file and what is wrong (exit 2), before the data is read."""

import json
import shutil

import pytest
from conftest import one_line_error, run_cli

from r2q.errors import UserError
from r2q.models import INDEX, load_model


@pytest.fixture(scope="module")
def sharded(gpt2_dir, tmp_path_factory):
    """The tiny gpt2 saved in several safetensors shards with their index."""
    d = tmp_path_factory.mktemp("sharded") / "m"
    load_model(gpt2_dir).save_pretrained(d, max_shard_size="100KB")
    for f in gpt2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, d / f.name)
    assert len(list(d.glob("*.safetensors"))) > 1
    return d


def _damaged(sharded, tmp_path, index):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    (d / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    return d


def _index(sharded):
    return json.loads((sharded / INDEX).read_text())


def test_a_sharded_model_loads(sharded, gpt2_dir):
    import torch

    a, b = load_model(sharded), load_model(gpt2_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("damage, problem", [
    (lambda i: {"weight_map": i["weight_map"]}, "no 'metadata' object"),
    (lambda i: {"metadata": {}}, "no 'weight_map'"),
    (lambda i: {"metadata": {}, "weight_map": {}}, "no 'weight_map'"),
    (lambda i: [1, 2], "no 'weight_map'"),
    (lambda i: '{"metadata": {', "not a readable JSON index"),
    (lambda i: dict(i, weight_map={k: "../secret.safetensors" for k in i["weight_map"]}), "which is no shard file"),
    (lambda i: dict(i, weight_map=dict(i["weight_map"], extra="model-00099-of-00099.safetensors")),
     "'model-00099-of-00099.safetensors', which is no shard file"),
])
def test_a_damaged_shard_index_is_one_line(sharded, tmp_path, capsys, damage, problem):
    d = _damaged(sharded, tmp_path, damage(_index(sharded)))
    with pytest.raises(UserError, match=problem):
        load_model(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\n")
    code, _, err = run_cli(capsys, "generate", "--model", d, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert problem in one_line_error(code, err) and INDEX in err
    assert not (tmp_path / "o.jsonl").exists()


def test_train_checks_the_index_before_reading_data(sharded, tmp_path, capsys):
    d = _damaged(sharded, tmp_path, {"weight_map": _index(sharded)["weight_map"]})
    code, _, err = run_cli(capsys, "train", "--model", d, "--data", tmp_path / "missing.jsonl", "--out",
                           tmp_path / "run", "--quiet")
    assert "no 'metadata' object" in one_line_error(code, err)  # not the missing data file: the model comes first


def test_an_empty_metadata_object_is_enough(sharded, tmp_path):
    d = _damaged(sharded, tmp_path, dict(_index(sharded), metadata={}))
    assert load_model(d) is not None


@pytest.mark.parametrize("field, size, tensor", [("n_embd", 32, "transformer."), ("vocab_size", 400,
                                                                                  "transformer.wte.weight")])
def test_weights_of_another_size_name_the_tensor(gpt2_dir, tmp_path, field, size, tensor):
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir, d)
    config = json.loads((d / "config.json").read_text())
    config[field] = size
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        load_model(d)
    msg = str(e.value)
    assert tensor in msg and "in model.safetensors but" in msg and "config.json describes" in msg
    assert "above report" not in msg and "\n" not in msg

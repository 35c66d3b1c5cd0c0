"""Building a run, part by part: the trainable model (LoRA, dropout, checkpointing), the optimizer, the schedule,
the step plan and the comparison a resume makes with the run that wrote its checkpoint."""

import copy

import pytest
import torch

from r2q.errors import UserError
from r2q.models import load_model
from r2q.prepare import optimizer, schedule, shard, trainable
from r2q.train import TrainConfig
from r2q.train.rundir import resume_changes
from r2q.train.setup import plan_steps


@pytest.fixture()
def model(llama_dir):
    return load_model(llama_dir)


def test_trainable_turns_off_cache_and_dropout_and_adds_only_trainable_adapters(model):
    model.config.attention_dropout = 0.1
    model.train()
    m = trainable(copy.deepcopy(model), lora=(4, 8.0, 0.0, "q_proj,v_proj"), keep_dropout=False, checkpointing=True)
    assert m.config.use_cache is False
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-3] for n in names} == {"lora_A", "lora_B"}  # ...q_proj.lora_A.default.weight
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert all(p.p == 0 for p in m.modules() if isinstance(p, torch.nn.Dropout))
    assert m.base_model.model.is_activation_checkpointing
    full = trainable(copy.deepcopy(model), keep_dropout=True)
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize("targets", ["nope", "q_proj,nope", "q_proj,", "layers.0.self_attn.q,v_proj"])
def test_a_lora_target_that_matches_nothing_is_one_line(model, targets):
    """Each name must match (PEFT skipped one of several that did not, and wrote it into adapter_config.json)."""
    bad = [t for t in targets.split(",") if t not in ("q_proj", "v_proj")][0]
    with pytest.raises(UserError, match="empty name" if not bad else f"'{bad}' matches no module of Llama.*q_proj"):
        trainable(copy.deepcopy(model), lora=(4, 8.0, 0.0, targets))
    m = trainable(copy.deepcopy(model), lora=(4, 8.0, 0.0, "layers.0.self_attn.q_proj,v_proj"))
    assert {n.split(".lora_")[0] for n, p in m.named_parameters() if p.requires_grad} >= {
        "base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"}


def test_lora_on_gpt2s_conv1d_layers_raises_no_warning(gpt2_dir):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = trainable(load_model(gpt2_dir), lora=(4, 8.0, 0.0, "c_attn"))
    assert any("c_attn.lora_A" in n for n, p in m.named_parameters() if p.requires_grad)


def test_optimizer_decays_matrices_only(model):
    opt = optimizer(model, 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_schedule_warms_up_linearly_then_follows_its_shape(model, name):
    opt = optimizer(model, 1.0, 0.0)
    sched = schedule(opt, name, 4, 12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    if name == "constant":
        assert lrs[4:] == pytest.approx([1.0] * 8)
    else:
        assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0
        assert lrs[8] == pytest.approx(0.5)  # half-way through the decay, for both shapes


def test_sharding_a_model_without_layer_classes_is_refused():
    with pytest.raises(UserError, match="_no_split_modules"):
        shard(torch.nn.Linear(2, 2))


def test_step_plan_counts_micro_batches_and_says_what_to_lower():
    ex = [type("E", (), {"prompt_ids": [1, 2], "completion_ids": [3] * k})() for k in range(1, 11)]
    plan = plan_steps(TrainConfig(batch_size=2, grad_accum=2, epochs=2.5), 1, ex, 0)
    assert (plan.parts, plan.global_batch, plan.steps_per_epoch, plan.total_steps) == (2, 4, 3, 8)
    assert plan.lengths == [2 + k for k in range(1, 11)]
    assert plan_steps(TrainConfig(batch_size=2, max_steps=5), 2, ex, 0).total_steps == 5
    with pytest.raises(UserError, match="fewer than one per micro-batch.*lower --eval-fraction"):
        plan_steps(TrainConfig(batch_size=1, grad_accum=8, eval_fraction=0.5), 2, ex[:3], 3)


def test_resume_names_each_change_and_allows_only_a_longer_run():
    saved = {"model": "/m", "ref": "init", "lora_r": 0, "lr": 1e-3, "max_steps": 4, "eval_every": 2}
    state = {"config": saved, "inputs": {"model": "a", "tokenizer": "t", "data": "d", "reference": "a"}}
    now = dict(saved, max_steps=8, eval_every=5)
    assert resume_changes(state, now, state["inputs"]) == (["--max-steps 4 -> 8"], [])
    longer, diff = resume_changes(state, dict(now, lr=2e-3), dict(state["inputs"], reference="b", data="e"))
    assert diff == ["--lr 0.001 -> 0.002", "the training data (its tokens differ)",
                    "the starting model --model /m, the reference of --ref init (its weights changed)"]
    old = {"config": saved, "data_hash": "d"}  # a checkpoint of r2q before the inputs table
    assert resume_changes(old, saved, {"data": "x"})[1] == ["the training data (its tokens differ)"]

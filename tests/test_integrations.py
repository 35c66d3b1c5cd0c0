"""r2q inside TRL: the credit callback in a running DPOTrainer writes and logs the same per-token rewards that
`r2q credit` gives afterwards on the saved checkpoint, with a ref_model and with LoRA adapters switched off."""

import json

import pytest
from conftest import pref_rows

from r2q.errors import UserError

pytest.importorskip("trl")

ROWS = pref_rows(24, 0)


def _trainer(policy, ref, tokenizer_dir, out, peft_config=None, steps=4):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from r2q.models import load_tokenizer

    args = DPOConfig(output_dir=str(out), beta=0.2, learning_rate=5e-3, max_steps=steps, per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0,
                     seed=0, logging_steps=1, save_strategy="no", max_length=128)
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                      eval_dataset=Dataset.from_list(ROWS[:6]), processing_class=load_tokenizer(tokenizer_dir),
                      peft_config=peft_config)


def _credit_cli(capsys, tmp_path, model, ref, beta):
    from conftest import run_cli

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    code, _, err = run_cli(capsys, "credit", "--model", model, "--ref", ref, "--beta", beta, "--data", rows,
                           "--json", tmp_path / "cli.json", "--quiet")
    assert code == 0, err
    return json.loads((tmp_path / "cli.json").read_text())


def _same_rewards(a: dict, b: dict):
    assert len(a["pairs"]) == len(b["pairs"]) == 5
    for p, q in zip(a["pairs"], b["pairs"]):
        for side in ("chosen", "rejected"):
            assert p[side]["token_ids"] == q[side]["token_ids"]
            assert p[side]["rewards"] == pytest.approx(q[side]["rewards"], abs=2e-5)
    assert a["summary"]["rewards/margins"] == pytest.approx(b["summary"]["rewards/margins"], abs=2e-5)


def test_callback_in_trls_dpo_trainer_equals_r2q_credit_on_the_checkpoint(llama_dir, llama_ref_dir, tokenizer_dir,
                                                                          tmp_path, capsys):
    from r2q.integrations.trl import CreditCallback
    from r2q.models import load_model

    out = tmp_path / "trl"
    trainer = _trainer(load_model(llama_dir), load_model(llama_ref_dir), tokenizer_dir, out)
    logged = []
    real_log = trainer.log
    trainer.log = lambda logs, *a, **k: logged.append(dict(logs)) or real_log(logs, *a, **k)
    cb = CreditCallback(trainer, rows=ROWS[:5], every=2)
    trainer.add_callback(cb)
    trainer.train()
    assert sorted(cb.reports) == [2, 4]
    assert (out / "credit" / "step-2.json").exists() and (out / "credit" / "step-4.html").exists()
    credit_logs = [m for m in logged if "credit/rewards/margins" in m]
    assert len(credit_logs) == 2
    assert credit_logs[-1]["credit/rewards/margins"] == pytest.approx(cb.reports[4].summary["rewards/margins"])
    assert cb.reports[2].summary["rewards/margins"] != cb.reports[4].summary["rewards/margins"]  # it trained
    trainer.save_model(str(out / "final"))
    cli = _credit_cli(capsys, tmp_path, out / "final", llama_ref_dir, 0.2)
    _same_rewards(json.loads((out / "credit" / "step-4.json").read_text()), cli)


def test_with_lora_and_no_ref_model_the_reference_is_the_base(llama_dir, tokenizer_dir, tmp_path, capsys):
    from peft import LoraConfig

    from r2q.integrations.trl import CreditCallback
    from r2q.models import load_model

    out = tmp_path / "lora"
    trainer = _trainer(load_model(llama_dir), None, tokenizer_dir, out, steps=2,
                       peft_config=LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    cb = CreditCallback(trainer, rows=ROWS[:5], every=2)
    trainer.add_callback(cb)
    trainer.train()
    assert cb.reports[2].ref_source == "adapters-off"
    trainer.save_model(str(out / "adapter"))
    cli = _credit_cli(capsys, tmp_path, out / "adapter", llama_dir, 0.2)
    _same_rewards(json.loads((out / "credit" / "step-2.json").read_text()), cli)


def test_default_rows_come_from_the_eval_set_and_bad_settings_are_one_line(llama_dir, llama_ref_dir, tokenizer_dir,
                                                                          tmp_path):
    from r2q.integrations.trl import CreditCallback
    from r2q.models import load_model

    trainer = _trainer(load_model(llama_dir), load_model(llama_ref_dir), tokenizer_dir, tmp_path / "t")
    cb = CreditCallback(trainer, n=3)
    assert [r["chosen"] for r in cb.rows] == [r["chosen"] for r in ROWS[:3]] and cb.beta == 0.2
    with pytest.raises(UserError, match=r"every must be a positive integer \(steps\); got 0"):
        CreditCallback(trainer, every=0)

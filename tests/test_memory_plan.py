"""benchmarks/memory_plan.py: the paper-scale memory table, from configs on the meta device."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_plan import lora_params, plan  # noqa: E402


def test_parameter_counts_are_the_published_ones():
    assert plan("pythia-2.8b").params == 2_775_208_960  # EleutherAI/pythia-2.8b
    assert plan("llama-7b").params == 6_738_415_616  # Llama 2 7B


def test_lora_count_is_what_peft_trains(tokenizer):
    from peft import LoraConfig, get_peft_model

    from r2q.toy import tiny_model

    for arch in ("llama", "gpt_neox"):
        m = tiny_model(arch, len(tokenizer))
        want = lora_params(m, 8)
        peft = get_peft_model(m, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == want


def test_the_levers_lower_memory():
    full = plan("pythia-2.8b", checkpointing=False)
    assert plan("pythia-2.8b", checkpointing=True).activations_gib < full.activations_gib / 5
    assert plan("pythia-2.8b", reference="precomputed").reference_gib == 0 < full.reference_gib
    lora = plan("pythia-2.8b", lora_r=16)
    assert lora.trainable < full.params / 50 and lora.optimizer_gib < full.optimizer_gib / 50
    sharded = plan("pythia-2.8b", gpus=8)
    assert sharded.optimizer_gib == pytest.approx(full.optimizer_gib / 8, abs=0.01)
    assert sharded.reference_gib == full.reference_gib  # the frozen reference is not sharded


def test_the_script_prints_the_recipe_table():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--all"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.count("| pythia-2.8b |") >= 3 and out.count("| llama-7b |") >= 2

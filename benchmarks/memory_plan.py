"""Memory per GPU for DPO at the paper's scale, counted from model configs built on the meta device (no weights).

    python benchmarks/memory_plan.py [--model pythia-2.8b|llama-7b] [--batch 4] [--prompt 512] [--completion 128]
                                     [--gpus 1] [--lora-r 0] [--checkpointing] [--dtype bf16|fp32|bf16-weights]
                                     [--reference live|precomputed] [--all]

What is counted, in bytes, for one optimizer step of `r2q train` on one GPU:
- weights: every parameter (fp32, or bf16 with --dtype bf16-weights); sharded over --gpus (FSDP full shard);
- reference: a second copy of the weights when it runs live, whole on every GPU (r2q does not shard the frozen
  reference); none when precomputed (--precompute-ref) or with LoRA (the model with its adapters off);
- gradients and AdamW's two moments, for the trainable parameters only (all, or the LoRA adapters), sharded;
- activations of one micro-batch of `batch` pairs, prefix-shared (prompt + chosen + rejected tokens per row):
  per layer and token 34 * hidden bytes in 16-bit (Korthikanti et al. 2022, with a fused attention kernel, so the
  attention scores are not stored; doubled for fp32 activations), or, with gradient checkpointing, each layer's
  input (2 * hidden bytes per token) plus one layer's full activations during its recomputation;
- logits: only the completion positions go through the LM head (r2q's head-only scoring), kept in fp32 with their
  log-softmax: 8 * vocab bytes per completion token.
It is an estimate of the large terms (no allocator fragmentation, CUDA context or communication buffers: leave
10-20% of the card free), meant for choosing batch, length, LoRA and checkpointing before renting the GPUs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

GiB = 1024**3

# published configs of the models the paper and its users train (no download: the numbers are written here)
CONFIGS = {
    "pythia-2.8b": dict(model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=10240, vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                        tie_word_embeddings=False),
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                     tie_word_embeddings=False),
}


@dataclass
class Plan:
    model: str
    params: int
    trainable: int
    gpus: int
    batch_pairs: int
    tokens_per_row: int
    weights_gib: float
    reference_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    total_gib: float


def meta_model(name: str):
    """The model of CONFIGS[name] on the meta device: real module shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(CONFIGS[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def lora_params(model, r: int) -> int:
    """Adapter parameters of LoRA rank r on every linear layer but the output head (PEFT's all-linear)."""
    head = model.get_output_embeddings()
    return sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def plan(name: str, batch: int = 4, prompt: int = 512, completion: int = 128, gpus: int = 1, lora_r: int = 0,
         checkpointing: bool = False, dtype: str = "bf16", reference: str = "live") -> Plan:
    model = meta_model(name)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    trainable = lora_params(model, lora_r) if lora_r else n
    w = 2 if dtype == "bf16-weights" else 4  # bytes per weight; bf16 autocast keeps fp32 weights
    act = 2 if dtype in ("bf16", "bf16-weights") else 4  # bytes per activation element
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    tokens = batch * (prompt + 2 * completion)  # prefix-shared rows: the prompt once per pair
    weights = n * w + (lora_params(model, lora_r) * 4 if lora_r else 0)
    ref = 0 if (reference == "precomputed" or lora_r) else n * w
    grads = trainable * (4 if lora_r or dtype != "bf16-weights" else 2)
    opt = 2 * trainable * (4 if lora_r or dtype != "bf16-weights" else 2)
    per_layer_token = 34 * h * act / 2  # Korthikanti et al.'s 34 * s * b * h bytes in 16-bit
    if checkpointing:
        activations = L * tokens * 2 * h * act / 2 + tokens * per_layer_token
    else:
        activations = L * tokens * per_layer_token
    logits = batch * 2 * completion * V * 8
    shard = max(gpus, 1)
    parts = dict(weights_gib=weights / shard, reference_gib=ref, grads_gib=grads / shard,
                 optimizer_gib=opt / shard, activations_gib=activations, logits_gib=logits)
    parts = {k: v / GiB for k, v in parts.items()}
    return Plan(name, n, trainable, gpus, batch, prompt + 2 * completion, **{k: round(v, 2) for k, v in parts.items()},
                total_gib=round(sum(parts.values()), 2))


SETTINGS = [  # the settings docs/paper-recipe.md quotes
    dict(name="pythia-2.8b", gpus=1, batch=4, checkpointing=False, reference="live"),
    dict(name="pythia-2.8b", gpus=1, batch=4, checkpointing=True, reference="precomputed"),
    dict(name="pythia-2.8b", gpus=1, batch=8, lora_r=16, checkpointing=True),
    dict(name="pythia-2.8b", gpus=8, batch=4, checkpointing=False, reference="live"),
    dict(name="llama-7b", gpus=1, batch=4, lora_r=16, checkpointing=True),
    dict(name="llama-7b", gpus=8, batch=4, checkpointing=True, reference="precomputed"),
    dict(name="llama-7b", gpus=8, batch=2, checkpointing=True, reference="live"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(CONFIGS), default="pythia-2.8b")
    ap.add_argument("--batch", type=int, default=4, help="pairs per micro-batch per GPU")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--dtype", choices=("bf16", "fp32", "bf16-weights"), default="bf16")
    ap.add_argument("--reference", choices=("live", "precomputed"), default="live")
    ap.add_argument("--all", action="store_true", help="the settings of docs/paper-recipe.md, as a markdown table")
    a = ap.parse_args()
    if a.all:
        print("| model | GPUs | pairs/GPU | LoRA r | checkpointing | reference | weights | reference | grads | "
              "AdamW | activations | logits | total GiB/GPU |")
        print("| --- " * 13 + "|")
        for s in SETTINGS:
            kw = dict(s)
            p = plan(kw.pop("name"), **kw)
            print(f"| {p.model} | {p.gpus} | {p.batch_pairs} | {s.get('lora_r', 0) or '-'} | "
                  f"{'yes' if s.get('checkpointing') else 'no'} | "
                  f"{'adapters off' if s.get('lora_r') else s.get('reference', 'live')} | {p.weights_gib} | "
                  f"{p.reference_gib} | {p.grads_gib} | {p.optimizer_gib} | {p.activations_gib} | {p.logits_gib} | "
                  f"**{p.total_gib}** |")
        return
    p = plan(a.model, a.batch, a.prompt, a.completion, a.gpus, a.lora_r, a.checkpointing, a.dtype, a.reference)
    print(json.dumps(asdict(p), indent=1))


if __name__ == "__main__":
    main()

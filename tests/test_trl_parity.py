"""Parity with TRL's DPOTrainer: r2q's summed log-probs, implicit rewards and sigmoid DPO loss reproduce
the metrics `trl.DPOTrainer.evaluate()` reports, on the token ids TRL itself produced.

What TRL 1.16 does (trl/trainer/dpo_trainer.py), and so what this test relies on:

* Tokenization (standard, non-conversational format): the EOS *text* is appended to `chosen` and
  `rejected` (unless already there), then `prompt`, `prompt + chosen` and `prompt + rejected` are each
  tokenized with the tokenizer's defaults (`add_special_tokens=True`: BOS only if the tokenizer's
  post-processor adds one; ours adds none). `prompt_ids` is the longest common prefix of the three, and
  `chosen_ids` / `rejected_ids` are the rest, so they end with EOS. When tokens merge across the
  prompt/completion boundary, the end of the prompt moves into the completions (TRL warns once).
* Batching: DataCollatorForPreference makes 2B right-padded rows, [prompt+chosen]*B then
  [prompt+rejected]*B, completion_mask over the completion tokens; no position_ids are passed.
* Log-probs: a fused LM head scores only positions whose next-token label is a completion token and sums
  them over the completion (no length normalization unless loss_type ipo/sigmoid_norm or ld_alpha is set).
* Loss "sigmoid": -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over the pairs of a batch.
* Metrics (prefixed eval_): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
  (strict chosen > rejected), logps/chosen, logps/rejected (policy, summed), plus entropy, logits/*,
  mean_token_accuracy. Each is a mean over the pairs of one batch; `log` then averages the per-batch
  means (mean of batch means). eval_loss comes from transformers' Trainer: the batch loss repeated
  batch_size times, averaged over all samples. With one eval batch all of them are plain means over pairs.
* Settings: DPOConfig defaults bf16=True (when fp16 is unset), which on CPU would autocast to bf16, so
  bf16=False; gradient_checkpointing defaults to True (irrelevant in eval, switched off anyway).
  padding_free falls back to padding in 1.16; precompute_ref_log_probs is off by default (the ref model is
  run on every batch); max_length only truncates, so it is set well above the longest sequence.
"""

from __future__ import annotations

import json

import pytest
import torch

BETA = 0.1

PAIRS = [
    {"prompt": "12+30=", "chosen": "42", "rejected": "43"},
    {"prompt": "7+8=", "chosen": "15", "rejected": "14"},
    {"prompt": "55+21=", "chosen": "76", "rejected": "67"},
    {"prompt": "9+90=", "chosen": "99", "rejected": "909"},
    {"prompt": "33+33=", "chosen": "66", "rejected": "6"},
    {"prompt": "the movie was", "chosen": " great.", "rejected": " boring and long."},
    {"prompt": "the acting", "chosen": " was good.", "rejected": " was bad."},
    {"prompt": "a film with", "chosen": " a fun story.", "rejected": " a dull plot and the worst ending."},
    {"prompt": "I", "chosen": " loved the music.", "rejected": " hated it."},
    # the trailing space merges into the first completion token ("Ġg", "Ġb"): TRL moves the boundary
    {"prompt": "the plot was ", "chosen": "great.", "rejected": "boring."},
]
MERGING = {9}  # indices of the pairs whose prompt/completion boundary is not a token boundary

METRICS = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies")
RTOL, ATOL = 1e-4, 1e-6  # ATOL: rewards of the near-uniform random models are ~1e-2, known to ~1e-6 in fp32


def _approx(x, atol=ATOL):
    return pytest.approx(x, rel=RTOL, abs=atol)


def _atol(name: str, ours: dict) -> float:
    """What fp32 resolves: a reward is beta times the difference of two summed log-probs as large as |logps| (over
    100 here), and two correct implementations add in other orders (kernels, batch shapes, the CPU's instruction
    set), so each sum is known to a few units in its last place: 4 of them, times beta, per reward (seen: 1.4e-6
    on an AVX2 CPU, beside logps of 104, where 1e-6 had passed on AVX-512 ones). A dropped or shifted token moves a
    reward by ~1e-3 here, far outside this."""
    if not name.startswith("rewards/") or name == "rewards/accuracies":
        return ATOL
    big = max(ours["logps/chosen"].abs().max().item(), ours["logps/rejected"].abs().max().item())
    ulps = 4 * torch.finfo(torch.float32).eps * big * BETA
    return max(ATOL, ulps * (2 if name == "rewards/margins" else 1))


@pytest.fixture(scope="module", params=["random", "sharp"])
def model_dirs(request, tmp_path_factory, llama_dir, llama_ref_dir):
    """(policy, reference) directories. "random": the conftest models as they are (near-uniform next-token
    distributions, so rewards are ~1e-2). "sharp": the same with the LM head scaled by 25, so the two models
    disagree strongly (rewards ~1) and the rtol=1e-4 comparison bites."""
    if request.param == "random":
        return llama_dir, llama_ref_dir
    from r2q.models import load_model
    from r2q.toy import save_model

    out = []
    for name, src in (("policy", llama_dir), ("ref", llama_ref_dir)):
        model = load_model(src)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(25.0)
        out.append(save_model(model, None, tmp_path_factory.mktemp(f"sharp_{name}")))
    return tuple(out)


def _run_trl(tmp_dir, policy_dir, ref_dir, tokenizer_dir, batch_size):
    """Evaluate TRL's DPOTrainer on PAIRS: (reported metrics, per-batch metric lists, eval dataset)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from r2q.models import load_model, load_tokenizer

    class Recording(DPOTrainer):
        # `log` averages then clears the per-batch metric lists; keep a copy (per pair when batch_size=1).
        def log(self, logs, start_time=None):
            mode = "train" if self.model.training else "eval"
            self.per_batch = {k: list(v) for k, v in self._metrics[mode].items()}
            super().log(logs, start_time)

    args = DPOConfig(
        output_dir=str(tmp_dir), beta=BETA, loss_type=["sigmoid"], per_device_eval_batch_size=batch_size,
        per_device_train_batch_size=batch_size, max_length=512, report_to=[], use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    ds = Dataset.from_list(PAIRS)
    trainer = Recording(
        model=load_model(policy_dir), ref_model=load_model(ref_dir), args=args, train_dataset=ds,
        eval_dataset=ds, processing_class=load_tokenizer(tokenizer_dir),
    )
    metrics = trainer.evaluate()
    return metrics, trainer.per_batch, trainer.eval_dataset


@pytest.fixture(scope="module")
def trl_eval(tmp_path_factory, model_dirs, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("trl")
    policy_dir, ref_dir = model_dirs
    # one batch holding every pair: what evaluate() reports is then the mean over pairs
    metrics, _, ds = _run_trl(tmp / "full", policy_dir, ref_dir, tokenizer_dir, batch_size=len(PAIRS))
    # one pair per batch: the recorded per-batch lists are per-pair values, in dataset order
    _, per_pair, _ = _run_trl(tmp / "single", policy_dir, ref_dir, tokenizer_dir, batch_size=1)
    ids = {k: [list(x) for x in ds[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return {"metrics": metrics, "per_pair": per_pair, "ids": ids}


def test_trl_tokenization_is_what_we_assume(trl_eval, tokenizer):
    ids = trl_eval["ids"]
    assert len(ids["prompt_ids"]) == len(PAIRS)  # nothing filtered out
    eos = tokenizer.eos_token
    rows = zip(PAIRS, ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], strict=True)
    for i, (ex, p, c, r) in enumerate(rows):
        alone = tokenizer(ex["prompt"])["input_ids"]
        joint_c = tokenizer(ex["prompt"] + ex["chosen"] + eos)["input_ids"]
        joint_r = tokenizer(ex["prompt"] + ex["rejected"] + eos)["input_ids"]
        # prompt + completion is the joint tokenization with the EOS text appended (no BOS: this tokenizer
        # adds none); the prompt is the common prefix of the three tokenizations
        assert p + c == joint_c and p + r == joint_r
        assert c[-1] == r[-1] == tokenizer.eos_token_id
        if i in MERGING:
            assert len(p) < len(alone) and alone[: len(p)] == p
        else:
            assert p == alone


def _r2q_metrics(models, ids, pad_id, share_prefix):
    """Per-pair values computed by r2q on TRL's token ids."""
    from r2q.losses import dpo_loss
    from r2q.rewards import implicit_rewards, sequence_rewards
    from r2q.tokens import build_pair_batch, completion_logps

    policy, ref = models
    B = len(ids["prompt_ids"])
    batch = build_pair_batch(ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], pad_id,
                             share_prefix=share_prefix)
    mask = batch.completion_mask()
    with torch.no_grad():
        pol = completion_logps(policy, batch)
        ref_lp = completion_logps(ref, batch)
    logps = pol.masked_fill(~mask, 0.0).sum(-1)
    seq = sequence_rewards(implicit_rewards(pol, ref_lp, mask, BETA), mask)
    chosen, rejected = seq[:B], seq[B:]
    return {
        "logps/chosen": logps[:B], "logps/rejected": logps[B:],
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "loss": dpo_loss(chosen, rejected, BETA, loss_type="sigmoid"),
    }


@pytest.mark.parametrize(
    "share_prefix,attn",
    [
        (False, "sdpa"),
        (True, "sdpa"),
        (False, "eager"),
        (True, "eager"),  # the shared mask is additive: eager attention adds it to the scores
    ],
    ids=["plain-sdpa", "shared-sdpa", "plain-eager", "shared-eager"],
)
def test_matches_trl_dpo_metrics(trl_eval, model_dirs, tokenizer, share_prefix, attn):
    from r2q.models import load_model

    models = [load_model(d).eval() for d in model_dirs]
    for m in models:
        m.config._attn_implementation = attn
    ours = _r2q_metrics(models, trl_eval["ids"], tokenizer.pad_token_id, share_prefix)
    metrics = trl_eval["metrics"]

    # sanity: the two models differ, and no pair sits on the accuracy threshold
    assert ours["rewards/margins"].abs().min() > 1e-4
    assert ours["rewards/chosen"].abs().max() > 1e-3

    # per pair: TRL run with one pair per batch
    per_pair = trl_eval["per_pair"]
    for name in METRICS:
        theirs = torch.tensor(per_pair[name], dtype=torch.float32)
        torch.testing.assert_close(ours[name], theirs, rtol=RTOL, atol=_atol(name, ours), msg=name)

    # what evaluate() reports: means over the pairs (one batch holding every pair)
    for name in METRICS:
        assert metrics[f"eval_{name}"] == _approx(ours[name].mean().item(), _atol(name, ours)), name
    assert metrics["eval_loss"] == _approx(ours["loss"].mean().item(), _atol("rewards/margins", ours))
    # the loss is the sigmoid DPO loss of the summed rewards
    torch.testing.assert_close(ours["loss"], -torch.nn.functional.logsigmoid(ours["rewards/margins"]))


def test_data_loader_matches_trl_tokenization(tmp_path, trl_eval, tokenizer):
    data = pytest.importorskip("r2q.data")
    if not hasattr(data, "load_preferences"):
        pytest.skip("r2q.data has no load_preferences")
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in PAIRS))
    loaded = data.load_preferences(str(path), tokenizer, 512, 256)
    examples = loaded[0] if isinstance(loaded, tuple) else loaded  # (examples, report)

    def get(ex, key):
        return list(ex[key] if isinstance(ex, dict) else getattr(ex, key))

    assert len(examples) == len(PAIRS)
    ids = trl_eval["ids"]
    eos_id = tokenizer.eos_token_id
    for i, (pair, ex) in enumerate(zip(PAIRS, examples, strict=True)):
        ours = {k: get(ex, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        theirs = {k: ids[k][i] for k in ours}
        # Both end the completions with EOS, add no BOS here, and score the same text. They differ in one
        # documented way: r2q.data tokenizes prompt and completion separately (the boundary stays where the
        # text puts it), TRL tokenizes prompt + completion jointly and cuts at the common prefix. Where the
        # boundary is a token boundary the ids are identical.
        assert ours["prompt_ids"] == tokenizer(pair["prompt"])["input_ids"]
        for key, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
            assert ours[key] == tokenizer(pair[name], add_special_tokens=False)["input_ids"] + [eos_id]
            # same text either way
            assert (tokenizer.decode(ours["prompt_ids"] + ours[key])
                    == tokenizer.decode(theirs["prompt_ids"] + theirs[key]))
        if i in MERGING:
            assert ours != theirs
        else:
            assert ours == theirs, i

"""Loading policies, references and tokenizers, checked against each other; dropout off for training."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import check_attention, missing_package
from .errors import UserError, UserTypeError, first_line

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _looks_local(path: str) -> bool:
    """A path the user meant as a directory (a hub id is `name` or `org/name`)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") > 1


def check_model_path(path: str | os.PathLike, what: str = "model") -> None:
    """A missing local directory is named as such, not passed to the hub as a malformed repo id."""
    p = str(path)
    if not p:
        raise UserError(f"no {what} given")
    if not Path(p).exists() and _looks_local(p):
        raise UserError(f"{p}: no such {what} directory")
    if Path(p).exists() and not Path(p).is_dir():
        raise UserError(f"{p}: a file; the {what} must be a directory holding config.json and weights")
    if what != "tokenizer" and Path(p).is_dir():
        check_shard_index(Path(p))


def load_model(path: str | os.PathLike, dtype: str = "fp32", trust_remote_code: bool = False, attn: str = ""):
    """A causal LM from a local directory or hub id, weights from safetensors only (no pickle). attn: the attention
    implementation (transformers' attn_implementation; "" = what config.json says, else sdpa)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    check_attention(attn)
    check_model_path(path)
    if not attn:
        check_config_kernel(Path(path))
    if (Path(path) / "adapter_config.json").is_file():
        return _load_adapter_model(Path(path), dtype, trust_remote_code, attn)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn} if attn else {}))
    except ImportError as e:  # a package the model needs: its attention kernel's, its own code's, a quantizer's
        hint = " (choose another kernel with --attn-implementation, e.g. sdpa)" if re.search(
            r"attention|flash|kernel", str(e), re.I) else ""
        raise UserError(f"cannot load a model from {path}: {first_line(e)}{hint}") from e
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:  # missing, damaged or mismatched files
        why = first_line(e)
        if "ignore_mismatched_sizes" in why:  # transformers points at a report it logged, which r2q does not show
            why = size_mismatch(Path(path), trust_remote_code) or "weights of other shapes than config.json says"
        raise UserError(f"cannot load a model from {path}: {_where(path)}{why}") from e
    return model


def check_config_kernel(path: Path) -> None:
    """A config.json whose attention implementation is a hub kernel ("org/name", given as a string or in a mapping
    of one per sub-config), or a flash kernel whose package is missing (for which transformers fetches a hub kernel
    when the `kernels` package is installed): transformers would download and run native code that no option of
    r2q asked for. Refused unless --attn-implementation names a kernel. (A hub id's config is not read here.)"""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no local config.json (a hub id), or one that loading will name as damaged
    for key in ("attn_implementation", "_attn_implementation"):
        v = config.get(key) if isinstance(config, dict) else None
        for name in (v.values() if isinstance(v, dict) else [v]):
            if not isinstance(name, str):
                continue
            if "/" in name:
                raise UserError(f"{path}/config.json asks for the attention kernel {name!r} from the hub, which "
                                "transformers would download and run as native code: choose a kernel with "
                                "--attn-implementation (e.g. sdpa)")
            if missing_package(name):
                raise UserError(f"{path}/config.json asks for {name}, whose package is not installed (transformers "
                                "would fetch a kernel from the hub in its place): choose a kernel with "
                                "--attn-implementation (e.g. sdpa)")


def size_mismatch(path: Path, trust_remote_code: bool = False) -> str:
    """The first tensor whose shape in the directory's safetensors files differs from the model config.json builds
    (built on the meta device: no memory, no weights read, only the files' headers), as one clause; '' if none."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in
                    AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).state_dict().items()}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    shape = tuple(h.get_slice(k).get_shape())
                    if k in want and want[k] != shape:
                        return (f"{k} is {list(shape)} in {f.name} but {list(want[k])} in the model config.json "
                                "describes (a config of another model size?)")
    except Exception:  # noqa: BLE001  (only the wording of an error already being raised depends on it)
        return ""
    return ""


INDEX = "model.safetensors.index.json"


def check_shard_index(path: Path) -> None:
    """A sharded model's index, read as transformers reads it: a JSON object with a 'metadata' object and a
    'weight_map' from tensor names to shard files in the directory. A damaged one is one line naming what is wrong
    (transformers meets it as a KeyError or TypeError deep in its loader)."""
    index = path / INDEX
    if not index.is_file():
        return
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{index}: not a readable JSON index of the weight shards ({first_line(e)})") from e
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict) or not data["weight_map"]:
        raise UserError(f"{index}: no 'weight_map' (tensor name -> shard file); the index of the shards is damaged")
    if not isinstance(data.get("metadata"), dict):
        raise UserError(f"{index}: no 'metadata' object, which transformers reads ({{}} is enough); the index of "
                        "the shards is damaged")
    root = path.resolve()
    for shard in sorted(set(map(str, data["weight_map"].values()))):
        at = (path / shard).resolve()
        if not (at.is_relative_to(root) and at.is_file()):
            raise UserError(f"{index} names {shard!r}, which is no shard file in {path}; the index or the shards "
                            "are damaged")


def _where(path: str | os.PathLike) -> str:
    """For a load that failed: that it went to the hub because no local directory has that name (a typo, often)."""
    return "" if Path(path).exists() else "no local directory of that name, and as a hub id: "


def adapter_base(path: str | os.PathLike) -> str:
    """The base model a PEFT adapter directory was trained on (its adapter_config.json)."""
    try:
        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: adapter_config.json does not name its base model ({first_line(e)})") from e
    if not base:
        raise UserError(f"{path}: adapter_config.json does not name its base model")
    return base


def check_adapter(path: Path) -> str:
    """A LoRA adapter directory's base, checked: weights in safetensors (a pickled adapter_model.bin could run code
    when loaded, so it is refused with the way to convert it), and no chain of bases that leads back to itself."""
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").is_file():
            raise UserError(f"{path} holds adapter_model.bin, a pickle, which r2q does not load (loading it could run "
                            "code); convert it once where you trust it: python -c \"import torch; from "
                            "safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', "
                            "weights_only=True), 'adapter_model.safetensors')\"")
        raise UserError(f"{path}: an adapter_config.json but no adapter_model.safetensors")
    seen, at = {path.resolve()}, path
    while (at / "adapter_config.json").is_file():
        at = Path(adapter_base(at))
        if at.exists() and at.resolve() in seen:
            which = "itself" if at.resolve() == path.resolve() else "an adapter whose base leads back to it"
            raise UserError(f"{path}: the LoRA adapter's base model is {which}; point base_model_name_or_path in "
                            "adapter_config.json at the model it was trained from")
        if not at.exists():
            break
        seen.add(at.resolve())
    return adapter_base(path)


def _load_adapter_model(path: Path, dtype: str, trust_remote_code: bool, attn: str = ""):
    """A LoRA adapter directory as a plain causal LM: its base with the adapter merged in (for scoring and search,
    where the merged weights run as fast as the base)."""
    from peft import PeftModel

    base = load_model(check_adapter(path), dtype, trust_remote_code, attn)
    try:
        with quiet_deprecations():
            return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the adapter in {path}: {first_line(e)}") from e


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence the FutureWarnings transformers raises for its own renames (gradient -> activation checkpointing) when
    r2q or PEFT call the old names: they say nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated",
                                category=FutureWarning)
        yield


def vocab_size(model) -> int:
    """Rows of the output layer: the size of the distribution pi(.|s) the model puts on tokens."""
    return model.get_output_embeddings().weight.shape[0]


def position_limit(*models) -> int | None:
    """The fewest positions any of the models can embed where one looks them up in a learned table (GPT-2's wpe,
    OPT's embed_positions, less its offset): a position past it indexes out of the table. None when none has such
    a table (rotary, ALiBi: positions past max_position_embeddings run, with whatever quality)."""
    limits = []
    for model in models:
        if model is None or not hasattr(model, "named_modules"):
            continue
        tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for name, m in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            if isinstance(m, torch.nn.Embedding) and m is not tokens and (last == "wpe" or "position" in last):
                limits.append(m.num_embeddings - int(getattr(m, "offset", 0)))
    return min(limits, default=None)


def config_position_limit(path: str | os.PathLike, trust_remote_code: bool = False) -> int | None:
    """`position_limit` of the model a directory's config.json describes, built on the meta device (no weights read,
    no memory); None when there is no config.json or the model has no learned position table."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return position_limit(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the model's config.json in {path}: {first_line(e)}") from e


def check_loaded(model, what: str = "policy") -> None:
    """The library's functions take loaded models: a path (or hub id) where one belongs is one line saying how."""
    if isinstance(model, (str, os.PathLike)):
        raise UserTypeError(f"{what} must be a loaded model, not the path {str(model)!r}: load it first with "
                            "r2q.models.load_model(path)")
    if not isinstance(model, torch.nn.Module):
        raise UserTypeError(f"{what} must be a loaded model (a torch.nn.Module); got {type(model).__name__}")


def check_tokenizer(tokenizer) -> None:
    """A loaded tokenizer (what transformers' tokenizers are: callable, with a vocabulary), not its path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        raise UserTypeError(f"tokenizer must be a loaded tokenizer, not the path {str(tokenizer)!r}: load it first "
                            "with r2q.models.load_tokenizer(path)")
    if not (callable(tokenizer) and hasattr(tokenizer, "get_vocab")):
        raise UserTypeError(f"tokenizer must be a loaded tokenizer (a transformers tokenizer); got "
                            f"{type(tokenizer).__name__}")


def has_head(model) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and getattr(get(), "weight", None) is not None


def check_vocab(tokenizer, policy, other=None, what: str = "reference") -> None:
    """Token-level rewards compare log-probs of one token under two models: both must score the same
    vocabulary, and the tokenizer must not produce ids beyond it."""
    check_tokenizer(tokenizer)
    if not has_head(policy) or (other is not None and not has_head(other)):
        return  # not an HF causal LM (a test double, a wrapper): nothing to compare
    v = vocab_size(policy)
    if len(tokenizer) > v:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the policy's output layer only {v}")
    if other is not None and vocab_size(other) != v:
        raise UserError(f"the policy scores {v} tokens but the {what} {vocab_size(other)}; token-level rewards "
                        "need one shared vocabulary")


def load_reference(path: str | os.PathLike, tokenizer, policy, dtype: str = "fp32", trust_remote_code: bool = False,
                   what: str = "reference", attn: str = ""):
    """The model that `what` names, checked against the policy: same tokenizer (when it has tokenizer files)
    and same output vocabulary."""
    check_model_path(path, what)
    if Path(path, "tokenizer_config.json").exists() or Path(path, "tokenizer.json").exists():
        check_same_tokenizer(tokenizer, load_tokenizer(path, trust_remote_code), f"policy and {what}")
    model = load_model(path, dtype, trust_remote_code, attn)
    check_vocab(tokenizer, policy, model, what)
    return model


# what AutoTokenizer reads from a directory: a fast tokenizer's file, its config, or a slow tokenizer's vocabulary
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved beside a model; a pad token is set to EOS if it has none."""
    from transformers import AutoTokenizer

    check_model_path(path, "tokenizer")
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"cannot load a tokenizer from {path}: no tokenizer files in it (none of "
                        f"{', '.join(_TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a tokenizer file of the wrong shape
        raise UserError(f"cannot load a tokenizer from {path}: {_where(path)}{first_line(e)}") from e
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer at {path} has no EOS token; completions need one to end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else EOS (padding is masked out everywhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_same_tokenizer(a, b, what: str = "policy and reference") -> None:
    """Token-level rewards compare two models token by token: they must share one vocabulary."""
    if a.get_vocab() != b.get_vocab():
        raise UserError(f"the {what} tokenizers differ; token-level rewards need one shared vocabulary")


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of the model off: nn.Dropout modules and the attention dropout rates that attention layers
    keep as numbers (as TRL's disable_dropout)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)

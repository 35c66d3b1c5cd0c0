"""On-disk cache of the reference policy's per-token log-probs.

The key is a hash of the reference weights, the tokenizer's vocabulary and the exact token ids of the data,
so any change to one of them misses. One safetensors file per key holds every completion's per-token
log pi_ref(a_t|s_t) concatenated, with offsets. `r2q train --precompute-ref` writes it; `r2q credit` reads it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import note
from .paths import writing


def default_cache_dir() -> Path:
    return Path(os.environ.get("R2Q_CACHE", Path.home() / ".cache" / "r2q")) / "ref_logps"


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


def data_hash(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """Hash of (prompt ids, completion ids) for every scored completion, in order."""
    h = hashlib.sha256()
    for p, c in sequences:
        h.update(repr((list(p), list(c))).encode())
    return h.hexdigest()


def cache_key(ref_weights: str, tokenizer, sequences) -> str:
    h = hashlib.sha256(f"{ref_weights}|{tokenizer_hash(tokenizer)}|{data_hash(sequences)}".encode())
    return h.hexdigest()[:32]


def completion_sequences(examples: Sequence) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every scored completion, in cache order: chosen then rejected of each
    pair, or each completion of SFT-style examples."""
    if examples and hasattr(examples[0], "chosen_ids"):
        return [(e.prompt_ids, c) for e in examples for c in (e.chosen_ids, e.rejected_ids)]
    return [(e.prompt_ids, e.completion_ids) for e in examples]


def cache_path(cache_dir: str | os.PathLike | None, ref_weights: str, tokenizer, examples: Sequence) -> Path:
    """The cache file of these examples' reference log-probs (ref_weights = `weights_hash(ref)`)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"{cache_key(ref_weights, tokenizer, completion_sequences(examples))}.safetensors"


def save(path: Path, logps: Sequence[torch.Tensor]) -> None:
    """Atomic write of a list of 1-D per-token log-prob tensors, under a temp name of its own (runs that share the
    cache and write the same entry at once never collide: each renames a complete file into place)."""
    lengths = torch.tensor([len(x) for x in logps], dtype=torch.long)
    flat = torch.cat([x.float().cpu() for x in logps]) if logps else torch.zeros(0)
    with writing(path, need=4 * (len(flat) + len(lengths) * 2) + 4096):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        with writing(path, cleanup=Path(tmp)):
            save_file({"logps": flat.contiguous(), "lengths": lengths}, tmp)
            os.replace(tmp, path)


def try_load(path: Path, n: int, note=note) -> list[torch.Tensor] | None:
    """The cached log-probs if the file exists and holds n sequences; a damaged file is said and ignored
    (scored again and rewritten)."""
    if not path.exists():
        return None
    try:
        logps = load(path)
    except Exception as e:  # noqa: BLE001 - an unreadable cache file is only a miss
        note(f"reference cache {path} is damaged ({type(e).__name__}); scoring again")
        return None
    if len(logps) != n:
        note(f"reference cache {path} holds {len(logps)} sequences, not {n}; scoring again")
        return None
    return logps


def load(path: Path) -> list[torch.Tensor]:
    d = load_file(str(path))
    return list(torch.split(d["logps"], d["lengths"].tolist()))

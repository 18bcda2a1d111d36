"""Export a trained reference checkpoint for shipping: the HF model in bfloat16,
its tokenizer and metrics, without the optimizer state used for resuming.

``python -m vllm_d2moe.reference.export TRAINED_DIR OUT_DIR``
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SHIPPED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "reference_metrics.json")


def export_for_shipping(trained: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=dtype)
    model.save_pretrained(out)
    for name in SHIPPED_FILES:
        if (trained / name).is_file():
            shutil.copy2(trained / name, out / name)
    return out


if __name__ == "__main__":
    export_for_shipping(Path(sys.argv[1]), Path(sys.argv[2]))

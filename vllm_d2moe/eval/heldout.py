"""The held-out tokens every model is scored on.

A split of the reference corpus is encoded with the model's own tokenizer as
one ``<s> doc </s>`` stream (exactly as the trainer does) and cut into
``tokens // window`` windows of ``window + 1`` tokens spread evenly over the
stream; the last ``window`` tokens of each are scored. Same model, split and
sizes: same tokens, bit for bit. With ``window`` equal to the training context
and ``tokens=65536`` on the valid split these are the windows behind the
perplexity in a reference model's ``reference_metrics.json``.
"""

from pathlib import Path

import torch

from vllm_d2moe.reference import corpus
from vllm_d2moe.reference.tokenizer import encode_documents, load_tokenizer
from vllm_d2moe.token_windows import eval_windows


def heldout_windows(
    model_dir: str | Path, split: str, tokens: int, window: int, corpus_dir: str | Path | None = None
) -> torch.Tensor:
    """``[tokens // window, window + 1]`` int64 token ids."""
    corpus_dir = corpus.ensure_corpus(Path(corpus_dir) if corpus_dir else None)
    stream = encode_documents(load_tokenizer(model_dir), corpus.load_split(split, corpus_dir))
    return eval_windows(stream, window, tokens)

"""Byte-level BPE tokenizer for the reference model.

GPT-2 style: byte-level pre-tokenizer with the GPT-2 split regex, so every
string round-trips and there is no unknown token.  The tokenizer adds ``<s>``
in front of every encoded text (as Llama/Mixtral do), so prompts served by
vLLM start the same way training documents do.  Training documents are encoded
as ``<s> text </s>`` and concatenated into one token stream.

Saved with ``save_pretrained`` as ``tokenizer.json`` + ``tokenizer_config.json``
+ ``chat_template.jinja``, loadable by ``transformers.AutoTokenizer`` and hence by
vLLM. The model saw no dialogue in training; the minimal chat template
(:data:`CHAT_TEMPLATE`: ``role: content`` lines, then ``assistant:``) only lets
chat clients (vLLM's ``/v1/chat/completions``) use it out of the box.

Note for llama.cpp's ``convert_hf_to_gguf.py``: it recognises BPE pre-tokenizers
by a hash of the token ids for a fixed string, so this vocabulary needs its
hash registered with ``res = "gpt-2"`` (the pre-tokenizer is GPT-2's).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
BOS_ID = 0
EOS_ID = 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        # Byte-level BPE reproduces spaces exactly; the legacy cleanup would not.
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names the class "TokenizersBackend", unknown to 4.x (and to
    # tools pinned to it); "PreTrainedTokenizerFast" loads in both.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(path))


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> np.ndarray:
    """One stream of ``<s> doc </s>`` for all ``texts``, as uint16 token ids."""
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise ValueError("vocabulary too large for uint16 token streams")
    # The Rust backend encodes the batch in parallel.
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts))
    stream = []
    for encoding in encodings:
        stream.extend(encoding.ids)
        stream.append(EOS_ID)
    return np.asarray(stream, dtype=np.uint16)

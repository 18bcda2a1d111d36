"""Calibration inputs of every routed expert, from running the source model on text.

``d2moe convert --calibrate`` fits each expert's MWQ widths to the expert's own
inputs (:mod:`vllm_d2moe.mwq.calibrate`). This module provides them:

* :func:`calibration_tokens`: the text (the reference corpus's train split by
  default, or the user's text files / JSON lines), tokenized with the source
  model's tokenizer into ``[segments, SEGMENT_TOKENS]`` ids. Empty text, too few
  tokens for the request, or ids outside the model's vocabulary (a tokenizer or
  pre-tokenized JSON lines of another model) are refused before any work.
* :class:`ExpertInputs`: the source model (transformers, float32, on the CPU) run a
  decoder layer at a time over those tokens; only the current layer's weights are
  in memory (read from the converter's memory-mapped source files), with the
  hidden states of all tokens between layers. In a MoE layer a hook on the fused
  experts module sees each token's routing exactly as the model computes it and
  accumulates, per expert, ``X^T X`` of the tokens routed to it (the input of gate
  and up) and of ``act(gate) * up`` under the source weights (the input of down).

Layers are asked for in increasing order; asking for a later layer runs the ones
before it without statistics, which is how a resumed conversion catches up.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_d2moe.converters.architectures import ConversionError

SEGMENT_TOKENS = 256  # the reference model's training context
DEFAULT_TOKENS = 16384
SEGMENTS_PER_FORWARD = 8  # bounds attention's memory


@dataclass(frozen=True)
class CalibrationText:
    """Calibration token ids ``[segments, SEGMENT_TOKENS]`` and where they came from."""

    tokens: torch.Tensor
    origin: str

    def fingerprint(self) -> dict:
        """What a resumed conversion must match (the same tokens)."""
        digest = hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()
        return {"tokens": int(self.tokens.numel()), "sha256": digest}


@dataclass(frozen=True)
class LayerStatistics:
    """Per expert: ``gate_up [E, hidden, hidden]`` and ``down [E, inter, inter]`` (``X^T X``,
    float32) and the number of tokens routed to it."""

    gate_up: torch.Tensor
    down: torch.Tensor
    tokens: torch.Tensor


def _documents(paths: list[Path]) -> list[dict]:
    """``{"text": ...}`` or ``{"input_ids": [...]}`` per document of the given files."""
    documents = []
    for path in paths:
        if not path.is_file():
            raise ConversionError(f"calibration text {path} does not exist")
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ConversionError(f"calibration text {path}, line {number}: not JSON ({e})") from e
                if not isinstance(record, dict) or not ("text" in record or "input_ids" in record):
                    raise ConversionError(
                        f"calibration text {path}, line {number}: expected an object with "
                        f"'text' or 'input_ids'"
                    )
                documents.append(record)
        else:
            documents.append({"text": path.read_text(encoding="utf-8")})
    return documents


def calibration_tokens(
    model_dir: Path, vocab_size: int, tokens: int, text: list[Path] | None = None
) -> CalibrationText:
    """The first ``tokens`` (rounded down to whole segments) of the calibration text, as
    ``[segments, SEGMENT_TOKENS]`` int64 ids."""
    from transformers import AutoTokenizer

    if tokens < SEGMENT_TOKENS:
        raise ConversionError(
            f"--calibration-tokens {tokens}: at least one segment of {SEGMENT_TOKENS} tokens is needed"
        )
    if text:
        documents, origin = _documents(text), ", ".join(map(str, text))
    else:
        from vllm_d2moe.reference import corpus

        documents = corpus.load_split("train", corpus.ensure_corpus(None))
        documents, origin = [{"text": d} for d in documents], "the reference corpus (train split)"
        random.Random(0).shuffle(documents)  # spread over both sources, same tokens every run
    if not any(d.get("input_ids") or str(d.get("text", "")).strip() for d in documents):
        raise ConversionError(f"calibration text is empty: {origin}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{model_dir} has no usable tokenizer for the calibration text ({e})") from e
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's vocab_size "
            f"is {vocab_size}: calibration text would be tokenized with another vocabulary"
        )
    stream, need = [], tokens // SEGMENT_TOKENS * SEGMENT_TOKENS
    for document in documents:
        if "input_ids" in document:
            ids = [int(i) for i in document["input_ids"]]
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ConversionError(
                    f"calibration text {origin}: token id {bad[0]} is outside the model's vocabulary "
                    f"(vocab_size {vocab_size}): it was tokenized with another vocabulary"
                )
        elif str(document["text"]).strip():
            ids = tokenizer(str(document["text"]), verbose=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        else:
            continue
        stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConversionError(
            f"calibration text {origin} has {len(stream)} tokens; --calibration-tokens asks for {tokens}"
        )
    ids = torch.tensor(stream[:need], dtype=torch.int64).view(-1, SEGMENT_TOKENS)
    return CalibrationText(ids, origin)


class ExpertInputs:
    """The source model run a layer at a time over ``tokens``; :meth:`layer` gives a MoE
    layer's per-expert statistics. ``plan`` is the converter's checked source plan and
    ``source`` its memory-mapped files."""

    def __init__(self, plan, source, tokens: torch.Tensor):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.plan, self.source = plan, source
        config = AutoConfig.from_pretrained(str(plan.src))
        config._attn_implementation = "sdpa"  # causal without a mask
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rotary = self.model.model.rotary_emb
        self.rotary = type(rotary)(config=config)
        self.tokens = tokens
        embedding = self._tensor("model.embed_tokens.weight").float()
        self.hidden = embedding[tokens]
        self.next_layer = 0
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        self.position_embeddings = self.rotary(self.hidden[:1], positions)
        self.positions = positions

    def _tensor(self, name: str) -> torch.Tensor:
        from vllm_d2moe.converters.convert import MatrixPart

        tensor = self.plan.tensors.get(name)
        if tensor is None:
            raise ConversionError(f"calibration: tensor {name} is missing from the source checkpoint")
        return self.source.matrix(MatrixPart(tensor)).view(tensor.shape)

    def _source_name(self, layer: int, name: str) -> str:
        """The checkpoint name of a decoder layer parameter (module ``mlp`` is Mixtral's
        ``block_sparse_moe`` in its checkpoints)."""
        full = f"model.layers.{layer}.{name}"
        if full in self.plan.tensors:
            return full
        moe_prefix = self.plan.arch.per_expert_template.split(".experts.")[0].format(layer=layer)
        if name.startswith("mlp."):
            renamed = f"{moe_prefix}.{name[len('mlp.'):]}"
            if renamed in self.plan.tensors:
                return renamed
        raise ConversionError(f"calibration: no source tensor for {full} (layer {layer}, parameter {name})")

    def _load_layer(self, layer: int) -> torch.nn.Module:
        module = self.model.model.layers[layer].to_empty(device="cpu")
        experts = self.plan.experts.layers.get(layer)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if experts is not None and name.endswith("experts.gate_up_proj"):
                    param.copy_(
                        torch.stack(
                            [torch.cat([self.source.matrix(p) for p in e.gate_up]) for e in experts]
                        )
                    )
                elif experts is not None and name.endswith("experts.down_proj"):
                    param.copy_(torch.stack([self.source.matrix(e.down) for e in experts]))
                else:
                    param.copy_(self._tensor(self._source_name(layer, name)))
            for name, _ in module.named_buffers():
                raise ConversionError(f"calibration: layer {layer} has a buffer {name} it cannot load")
        return module

    def _experts_module(self, module: torch.nn.Module, layer: int) -> torch.nn.Module:
        for name, child in module.named_modules():
            if name.endswith("experts") and hasattr(child, "gate_up_proj"):
                return child
        raise ConversionError(f"calibration: layer {layer} has no fused experts module")

    def _run(self, layer: int, statistics: LayerStatistics | None) -> None:
        module = self._load_layer(layer)
        handle = None
        if statistics is not None:
            experts = self._experts_module(module, layer)

            def accumulate(_, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                for e in index.unique().tolist():
                    if not 0 <= e < statistics.tokens.numel():
                        continue
                    x = hidden[(index == e).any(-1)].float()
                    gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
                    mid = experts.act_fn(gate) * up
                    statistics.gate_up[e] += x.t() @ x
                    statistics.down[e] += mid.t() @ mid
                    statistics.tokens[e] += x.shape[0]

            handle = experts.register_forward_pre_hook(accumulate, with_kwargs=True)
        try:
            with torch.no_grad():
                for first in range(0, self.hidden.shape[0], SEGMENTS_PER_FORWARD):
                    chunk = self.hidden[first : first + SEGMENTS_PER_FORWARD]
                    cos, sin = self.position_embeddings
                    out = module(
                        chunk,
                        position_embeddings=(cos.expand(len(chunk), -1, -1), sin.expand(len(chunk), -1, -1)),
                        attention_mask=None,
                        position_ids=self.positions.expand(len(chunk), -1),
                    )
                    self.hidden[first : first + SEGMENTS_PER_FORWARD] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
            self.model.model.layers[layer] = module.to("meta")  # frees the layer's weights

    def layer(self, layer: int) -> LayerStatistics:
        """Statistics of MoE layer ``layer`` (later than any asked for before)."""
        if layer < self.next_layer:
            raise ValueError(
                f"calibration statistics of layer {layer} were asked for after layer {self.next_layer - 1}"
            )
        while self.next_layer < layer:
            self._run(self.next_layer, None)
            self.next_layer += 1
        experts = self.plan.experts.layers[layer]
        hidden = experts[0].down.tensor.shape[-2]
        inter = experts[0].down.tensor.shape[-1]
        n = len(experts)
        statistics = LayerStatistics(
            torch.zeros(n, hidden, hidden), torch.zeros(n, inter, inter), torch.zeros(n, dtype=torch.int64)
        )
        self._run(layer, statistics)
        self.next_layer = layer + 1
        return statistics

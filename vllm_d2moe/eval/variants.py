"""The served models an accuracy run compares, and their bits per weight.

* ``unquantized``: the source checkpoint; the reference for KL and top-1.
* ``mwq-B``: one d2moe checkpoint (``d2moe convert`` with widths
  ``min(widths)..max(widths)``), served by vLLM's ``d2moe`` method at width B
  through ``hf_overrides``.
* ``rtn-B``: independent round-to-nearest at width B, same group size
  (fake-quantized checkpoint, see ``fake_quant``).
* ``int8``: symmetric per-channel INT8 (fake-quantized checkpoint).
* ``mwq-B+dense-M``: the same with the ``dense`` option M (non-expert linear
  layers as weight-only int8 / int4); its bits per weight count the experts alone.
* ``router`` / ``router-T``: the MWQ checkpoint with a trained bit-width router
  (``--router``), at its trained capacities / at target average width T;
  ``shuffled`` / ``shuffled-T``: the same with the router's choices dealt at
  random among the pairs of each call (same width mix, no learned choice).
  Their bits per weight are measured while scoring (the widths served).

Bits per weight count routed-expert weights only (everything else keeps the
source dtype in every variant), scales and zeros included: MWQ from its
checkpoint layout (the bytes a width reads, 64-byte alignment padding
included); RTN as the same layout with one width (packed codes plus float16
scale and zero per group: what a d2moe checkpoint with ``min_bits == max_bits``
stores); INT8 as 8 bits plus one float16 scale per output row.
"""

import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from vllm_d2moe.converters.architectures import architecture
from vllm_d2moe.converters.convert import convert
from vllm_d2moe.eval.fake_quant import (
    int8_fake_quantize,
    rtn_fake_quantize,
    write_fake_quantized,
)
from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, QUANT_METHOD, MWQCheckpoint
from vllm_d2moe.mwq.layout import ExpertLayout
from vllm_d2moe.mwq.quantize import SCALE_DTYPE, MWQSpec
from vllm_d2moe.router.model import ROUTER_FILE

METHODS = ("mwq", "rtn", "int8")
ROUTED_METHODS = ("router", "shuffled")
REFERENCE = "unquantized"


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # REFERENCE or one of METHODS
    bits: int | None  # quantization width; None for the unquantized model
    model: str
    bits_per_weight: float | None  # None: measured from the widths served (routed variants)
    quantization: str | None = None
    hf_overrides: dict = field(default_factory=dict)


def model_dtype(model_dir: str | Path) -> str:
    """The checkpoint's dtype name (``"float32"``, ``"bfloat16"``, ...), from config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def _expert_shapes(model_dir: Path) -> tuple[int, int]:
    """``(hidden, intermediate)`` of the routed experts."""
    config = json.loads((model_dir / "config.json").read_text())
    return config["hidden_size"], architecture(config.get("model_type")).intermediate_size(config)


def stored_bits_per_weight(layouts: list[tuple[ExpertLayout, int]], bits: int) -> float:
    """Stored bits per weight of experts with these ``(layout, number of experts)``."""
    stored = sum(8 * layout.nbytes(bits) * n for layout, n in layouts)
    weights = sum(
        rows * cols * n for layout, n in layouts for rows, cols in map(layout.shape, ("gate_up", "down"))
    )
    return stored / weights


def measured_bits_per_weight(model_dir: str | Path, width_histogram: dict) -> float:
    """Stored bits per weight of the widths actually served (``{bits: pairs}``)."""
    layouts = [(e.layout, e.num_experts) for e in MWQCheckpoint(model_dir).layers.values()]
    pairs = sum(width_histogram.values())
    return sum(stored_bits_per_weight(layouts, int(b)) * n for b, n in width_histogram.items()) / pairs


def routed_variants(mwq_dir: Path, router: Path, targets: list[float]) -> list[Variant]:
    """Copy ``router`` (a ``router.safetensors`` or a checkpoint holding one) into the MWQ
    checkpoint and return its served variants: the trained capacities, then each target."""
    source = router if router.is_file() else router / EXPERTS_DIR / ROUTER_FILE
    if not source.is_file():
        raise FileNotFoundError(f"--router {router}: no {EXPERTS_DIR}/{ROUTER_FILE} there")
    destination = mwq_dir / EXPERTS_DIR / ROUTER_FILE
    if not (destination.exists() and destination.samefile(source)):  # a router trained in place stays
        shutil.copyfile(source, destination)
    settings = [("", {})] + [(f"-{t:g}", {"target_bits": t}) for t in targets]
    return [
        Variant(
            f"{method}{suffix}", method, None, str(mwq_dir), None, quantization=QUANT_METHOD,
            hf_overrides={"quantization_config": {"quant_method": QUANT_METHOD, "width_policy": method, **options}},
        )
        for suffix, options in settings
        for method in ROUTED_METHODS
    ]


def _int8_bits(hidden: int, intermediate: int) -> float:
    matrices = [(2 * intermediate, hidden), (hidden, intermediate)]  # gate_up, down
    scale_bits = 8 * SCALE_DTYPE.itemsize
    stored = sum(rows * cols * 8 + rows * scale_bits for rows, cols in matrices)
    return stored / sum(rows * cols for rows, cols in matrices)


def build_variants(
    src: str | Path,
    work_dir: str | Path,
    methods: list[str],
    widths: list[int],
    group_size: int,
    router: Path | None = None,
    router_targets: list[float] = (),
    mwq_dir: Path | None = None,
    dense: list[str] = (),
) -> list[Variant]:
    """Write every checkpoint the comparison serves into ``work_dir``; the reference comes first.
    ``mwq_dir``: an existing conversion of ``src`` with widths ``min(widths)..max(widths)`` to serve
    instead of converting again. ``dense``: modes of the ``dense`` option each MWQ width is also served with."""
    src, work_dir = Path(src), Path(work_dir)
    hidden, intermediate = _expert_shapes(src)
    source_bits = torch.finfo(getattr(torch, model_dtype(src))).bits
    variants = [Variant(REFERENCE, REFERENCE, None, str(src), float(source_bits))]
    if "mwq" in methods:
        spec = MWQSpec(min(widths), max(widths), group_size)
        if mwq_dir is None:
            mwq_dir = convert(src, work_dir / "mwq", spec, overwrite=True, progress=False)
        elif MWQCheckpoint(mwq_dir).spec != spec:
            raise ValueError(f"{mwq_dir} holds {MWQCheckpoint(mwq_dir).spec}, not {spec}")
        mwq_layouts = [(e.layout, e.num_experts) for e in MWQCheckpoint(mwq_dir).layers.values()]
        variants += [
            Variant(
                f"mwq-{b}", "mwq", b, str(mwq_dir), stored_bits_per_weight(mwq_layouts, b), quantization=QUANT_METHOD,
                hf_overrides={"quantization_config": {"quant_method": QUANT_METHOD, "bits": b}},
            )
            for b in widths
        ]
        variants += [
            Variant(
                f"mwq-{b}+dense-{mode}", "mwq", b, str(mwq_dir), stored_bits_per_weight(mwq_layouts, b),
                quantization=QUANT_METHOD,
                hf_overrides={"quantization_config": {"quant_method": QUANT_METHOD, "bits": b, "dense": mode}},
            )
            for mode in dense
            for b in widths
        ]
        if router is not None:
            variants += routed_variants(mwq_dir, router, list(router_targets))
    elif router is not None:
        raise ValueError("--router needs the mwq method (the router runs on the MWQ checkpoint)")
    if "rtn" in methods:
        for b in widths:
            rtn_dir = work_dir / f"rtn-{b}"
            write_fake_quantized(src, rtn_dir, partial(rtn_fake_quantize, bits=b, group_size=group_size))
            layout = ExpertLayout(MWQSpec(b, b, group_size), hidden, intermediate)
            variants.append(Variant(f"rtn-{b}", "rtn", b, str(rtn_dir), stored_bits_per_weight([(layout, 1)], b)))
    if "int8" in methods:
        int8_dir = work_dir / "int8"
        write_fake_quantized(src, int8_dir, int8_fake_quantize)
        variants.append(Variant("int8", "int8", 8, str(int8_dir), _int8_bits(hidden, intermediate)))
    return variants

"""``d2moe inspect DIR``: a converted checkpoint's spec, expert layout and sizes,
then a verification of every expert checksum (exit code 1 on corruption)."""

import sys
from pathlib import Path

from vllm_d2moe.mwq.checkpoint import CheckpointError, LayerEntry, MWQCheckpoint
from vllm_d2moe.mwq.quantize import MWQError


def number_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _layer_group_lines(layers: list[LayerEntry]) -> list[str]:
    """Layout and per-width sizes of MoE layers that share one layout and expert count."""
    first = layers[0]
    layout = first.layout
    weights = sum(rows * cols for rows, cols in map(layout.shape, ("gate_up", "down")))
    lines = [
        f"{'layer' if len(layers) == 1 else 'layers'} {number_ranges([e.layer for e in layers])}: "
        f"{first.num_experts} experts, "
        f"gate_up {list(layout.shape('gate_up'))}, down {list(layout.shape('down'))}",
        f"  {'bits':>4}  {'bytes/expert':>14}  {'bytes/layer':>14}  {'bits/weight':>11}",
    ]
    for bits in layout.spec.widths:
        nbytes = layout.nbytes(bits)
        lines.append(
            f"  {bits:>4}  {nbytes:>14,}  {nbytes * first.num_experts:>14,}  {8 * nbytes / weights:>11.3f}"
        )
    return lines


def describe(ckpt: MWQCheckpoint) -> str:
    """Human-readable summary of a checkpoint (reads only its index and file sizes)."""
    spec, source = ckpt.spec, ckpt.source
    dense_files = sorted(ckpt.model_dir.glob("*.safetensors"))
    lines = [
        f"d2moe checkpoint {ckpt.model_dir}",
        f"source: {source.get('model_type', '?')} ({source.get('dtype', '?')}) from {source.get('path', '?')}",
        f"spec: widths {spec.min_bits}-{spec.max_bits} bits, group size {spec.group_size}",
        f"non-expert weights: {sum(p.stat().st_size for p in dense_files):,} bytes "
        f"in {len(dense_files)} safetensors file(s)",
        f"MoE layers: {len(ckpt.layers)}",
    ]
    groups: dict[tuple, list[LayerEntry]] = {}
    for entry in sorted(ckpt.layers.values(), key=lambda e: e.layer):
        groups.setdefault((entry.layout, entry.num_experts), []).append(entry)
    for layers in groups.values():
        lines += _layer_group_lines(layers)
    lines.append("expert bytes of all layers:")
    for bits in spec.widths:
        total = sum(e.layout.nbytes(bits) * e.num_experts for e in ckpt.layers.values())
        lines.append(f"  {bits} bits: {total:,}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", type=Path, help="a directory written by `d2moe convert`")


def run(args) -> int:
    try:
        ckpt = MWQCheckpoint(args.model_dir)
        print(describe(ckpt), flush=True)
        verified = ckpt.verify()
    except (CheckpointError, MWQError) as e:
        print(f"d2moe inspect: error: {e}", file=sys.stderr)
        return 1
    print(f"checksums: ok ({verified:,} bytes verified)")
    return 0

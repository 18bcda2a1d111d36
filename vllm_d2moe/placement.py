"""``d2moe placement CKPT --devices cpu:8GiB,cuda:0:24GiB``: which experts each rank
holds resident, at which width, and the disk reads per token that the rest cost.

One rank per device, as vLLM runs them with ``--tensor-parallel-size N``:

* tensor parallel (default): every rank serves every expert, holding its
  ``1/N`` slice of the intermediate dimension (its resident bytes are those of an
  expert ``N`` times narrower); a miss reads the whole width prefix, since the
  down projection's slice is strided inside it;
* ``--expert-parallel``: every rank holds whole experts, assigned the way vLLM's
  ``determine_expert_map`` does by default (contiguous blocks, the first
  ``E mod N`` ranks one more).

Each rank's expert budget is its memory less ``--reserve`` (KV cache,
activations) less its share of the non-expert weights (their file size over
``N``: attention and embeddings are split, a few small tensors are replicated,
so this is an estimate). Experts fill the budget at the serving width, most
frequently routed first; the rest are read from disk each time a token routes
to them. A token routes to ``top_k`` experts per layer: uniformly
(``top_k / E`` each) unless ``--routing-stats`` gives per-layer frequencies::

    {"layers": {"0": [n_0, n_1, ..., n_{E-1}], "1": [...], ...}}

counts (or shares) of tokens routed to each expert of that MoE layer; each
layer is rescaled to sum to ``top_k``. Layers left out stay uniform.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from vllm_d2moe.byte_sizes import format_bytes, parse_bytes
from vllm_d2moe.mwq.checkpoint import CheckpointError, MWQCheckpoint
from vllm_d2moe.mwq.inspect import number_ranges
from vllm_d2moe.mwq.layout import ExpertLayout


@dataclass(frozen=True)
class Device:
    name: str
    memory: int


def parse_devices(text: str) -> list[Device]:
    """``"cpu:8GiB,cuda:0:24GiB"``: each entry is a name, a colon and a memory size."""
    devices = []
    for entry in text.split(","):
        name, sep, size = entry.strip().rpartition(":")
        if not sep or not name:
            raise ValueError(f"device {entry!r} is not NAME:SIZE (e.g. cuda:0:24GiB)")
        devices.append(Device(name, parse_bytes(size, f"--devices {name}", allow_zero=True)))
    return devices


def ep_experts(num_experts: int, ep_size: int, rank: int) -> range:
    """The global experts of ``rank`` under vLLM's default ("linear") expert placement."""
    base, remainder = divmod(num_experts, ep_size)
    start = rank * base + min(rank, remainder)
    return range(start, start + base + (1 if rank < remainder else 0))


@dataclass
class RankPlan:
    rank: int
    device: Device
    dense_bytes: int  # this rank's share of the non-expert weights
    budget: int  # bytes left for resident experts
    experts: dict[int, list[int]]  # MoE layer -> experts this rank serves
    resident: dict[int, list[int]]  # MoE layer -> experts held in memory
    resident_bytes: int
    bytes_per_width: dict[int, int]  # all of this rank's experts resident at each width
    disk_bytes_per_token: float  # expected reads for experts that are not resident


def routing_shares(stats: dict | None, layer: int, num_experts: int, top_k: int) -> list[float]:
    """Expected number of times per token each expert of ``layer`` is routed to (sums to top_k)."""
    counts = (stats or {}).get("layers", {}).get(str(layer))
    if counts is None:
        return [top_k / num_experts] * num_experts
    if len(counts) != num_experts or sum(counts) <= 0:
        raise ValueError(
            f"routing stats of layer {layer}: need {num_experts} non-negative counts, not all zero"
        )
    return [top_k * c / sum(counts) for c in counts]


def plan_placement(
    ckpt: MWQCheckpoint,
    devices: list[Device],
    *,
    bits: int | None = None,
    expert_parallel: bool = False,
    reserve: int = 0,
    top_k: int,
    routing_stats: dict | None = None,
) -> list[RankPlan]:
    bits = ckpt.spec.max_bits if bits is None else bits
    if bits not in ckpt.spec.widths:
        raise ValueError(f"width {bits} is outside this checkpoint's widths {list(ckpt.spec.widths)}")
    n = len(devices)
    tp = 1 if expert_parallel else n  # vLLM folds TP into EP for the experts
    dense_total = sum(p.stat().st_size for p in ckpt.model_dir.glob("*.safetensors"))
    layouts: dict[int, ExpertLayout] = {}  # what one rank holds of one expert
    for layer, entry in ckpt.layers.items():
        if entry.layout.intermediate % tp:
            raise ValueError(
                f"layer {layer}: expert width {entry.layout.intermediate} does not split in {tp}"
            )
        layouts[layer] = ExpertLayout(ckpt.spec, entry.layout.hidden, entry.layout.intermediate // tp)
    plans = []
    for rank, device in enumerate(devices):
        experts = {
            layer: list(
                ep_experts(entry.num_experts, n, rank) if expert_parallel else range(entry.num_experts)
            )
            for layer, entry in sorted(ckpt.layers.items())
        }
        shares = {
            layer: routing_shares(routing_stats, layer, ckpt.layers[layer].num_experts, top_k)
            for layer in experts
        }
        dense = dense_total // n
        budget = max(0, device.memory - reserve - dense)
        # Most frequently routed first; ties in layer then expert order.
        candidates = sorted(
            ((layer, e) for layer, es in experts.items() for e in es),
            key=lambda le: (-shares[le[0]][le[1]], le),
        )
        resident: dict[int, list[int]] = {layer: [] for layer in experts}
        used, disk = 0, 0.0
        for layer, e in candidates:
            size = layouts[layer].nbytes(bits)
            if used + size <= budget:
                used += size
                resident[layer].append(e)
            else:
                disk += shares[layer][e] * ckpt.layers[layer].layout.nbytes(bits)
        plans.append(
            RankPlan(
                rank=rank,
                device=device,
                dense_bytes=dense,
                budget=budget,
                experts=experts,
                resident={layer: sorted(es) for layer, es in resident.items()},
                resident_bytes=used,
                bytes_per_width={
                    w: sum(layouts[layer].nbytes(w) * len(es) for layer, es in experts.items())
                    for w in ckpt.spec.widths
                },
                disk_bytes_per_token=disk,
            )
        )
    return plans


def _layer_lines(by_layer: dict[int, list[int]]) -> list[str]:
    return [f"    layer {layer}: experts {number_ranges(es)}" for layer, es in by_layer.items() if es]


def format_report(
    ckpt: MWQCheckpoint,
    plans: list[RankPlan],
    bits: int,
    expert_parallel: bool,
    top_k: int,
    routing_source: str,
) -> str:
    n = len(plans)
    mode = (
        f"expert parallel over {n} ranks: each rank holds whole experts"
        if expert_parallel
        else f"tensor parallel {n}: each rank holds a 1/{n} slice of every expert"
    )
    lines = [
        f"d2moe checkpoint {ckpt.model_dir}: {len(ckpt.layers)} MoE layers, top-{top_k}, "
        f"widths {ckpt.spec.min_bits}-{ckpt.spec.max_bits}, serving width {bits}",
        mode,
        f"routing: {routing_source}",
    ]
    for p in plans:
        held = sum(len(es) for es in p.resident.values())
        total = sum(len(es) for es in p.experts.values())
        missed = {layer: sorted(set(es) - set(p.resident[layer])) for layer, es in p.experts.items()}
        fits = [w for w, nbytes in p.bytes_per_width.items() if nbytes <= p.budget]
        lines += [
            f"rank {p.rank} {p.device.name} ({format_bytes(p.device.memory)}): "
            f"non-expert weights {format_bytes(p.dense_bytes)}, expert budget (memory_budget) {format_bytes(p.budget)}",
            f"  resident at {bits} bits: {held}/{total} experts, {format_bytes(p.resident_bytes)}",
            *_layer_lines(p.resident),
            f"  read from disk when routed to: {total - held} experts",
            *_layer_lines(missed),
            "  all its experts resident would need: "
            + ", ".join(f"{w} bits {format_bytes(b)}" for w, b in p.bytes_per_width.items())
            + (f" (all fit at up to {max(fits)} bits)" if fits else " (none fits)"),
            f"  expected disk reads per token: {format_bytes(p.disk_bytes_per_token)}",
        ]
    lines.append(
        f"expected disk reads per token, all ranks: {format_bytes(sum(p.disk_bytes_per_token for p in plans))}"
    )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", type=Path, help="a directory written by `d2moe convert`")
    parser.add_argument(
        "--devices",
        required=True,
        help="one NAME:SIZE per rank, comma-separated, e.g. cuda:0:24GiB,cuda:1:24GiB",
    )
    parser.add_argument("--expert-parallel", action="store_true", help="as vLLM's --enable-expert-parallel")
    parser.add_argument("--bits", type=int, default=None, help="serving width (default: the widest)")
    parser.add_argument(
        "--reserve", default="0", help="memory per device kept for KV cache and activations (e.g. 2GiB)"
    )
    parser.add_argument(
        "--routing-stats",
        type=Path,
        default=None,
        help='JSON {"layers": {"<layer>": [count per expert, ...]}} (default: uniform)',
    )


def run(args) -> int:
    try:
        devices, reserve = parse_devices(args.devices), parse_bytes(args.reserve, "--reserve", allow_zero=True)
        ckpt = MWQCheckpoint(args.model_dir)
        config = json.loads((args.model_dir / "config.json").read_text())
        top_k = config["num_experts_per_tok"]
        stats = json.loads(args.routing_stats.read_text()) if args.routing_stats else None
        plans = plan_placement(
            ckpt,
            devices,
            bits=args.bits,
            expert_parallel=args.expert_parallel,
            reserve=reserve,
            top_k=top_k,
            routing_stats=stats,
        )
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"d2moe placement: error: {e}", file=sys.stderr)
        return 1
    source = f"from {args.routing_stats}" if stats else f"uniform ({top_k} of each layer's experts per token)"
    print(format_report(ckpt, plans, args.bits or ckpt.spec.max_bits, args.expert_parallel, top_k, source))
    return 0

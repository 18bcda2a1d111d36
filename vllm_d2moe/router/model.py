"""The bit-width router of one MoE layer, and the routers' file in a d2moe checkpoint.

For each (token, routed expert) pair the router scores the K candidate widths::

    logit[t, j, k] = x_t . W[e, k] + bias[e, k] + gain[e, k] * w_tj      (e = expert of pair j)

``x_t`` is the token's MoE input (the hidden state the expert router sees),
``w_tj`` the pair's routing weight: the expert router's own confidence, which
costs nothing to pass in and lets a pair that contributes little to the sum go
cheaper. ``kind="expert"`` (the paper's choice) learns ``W, bias, gain`` per
expert; ``kind="layer"`` shares one set across the layer's experts. Either
costs one ``[tokens, hidden] x [hidden, E*K]`` product per layer call.

File: ``d2moe/router.safetensors`` beside the expert blobs, tensors
``layers.L.weight [E|1, K, hidden]``, ``layers.L.bias [E|1, K]``,
``layers.L.gain [E|1, K]`` (float32), and in the header metadata the widths,
capacities, kind, the target-bits calibration and how it was trained. The
expert blobs and their index are never touched.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, CheckpointError

ROUTER_FILE = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
KINDS = ("expert", "layer")


class WidthRouter(torch.nn.Module):
    """Scores the candidate widths of every (token, expert) pair of one layer."""

    def __init__(self, num_experts: int, hidden: int, num_widths: int, kind: str = "expert"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"router kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        rows = num_experts if kind == "expert" else 1
        # float32 whatever the default dtype (vLLM builds models under the serving dtype):
        # the router is tiny, and its scores decide ties between widths.
        self.weight = torch.nn.Parameter(torch.zeros(rows, num_widths, hidden, dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.zeros(rows, num_widths, dtype=torch.float32))
        self.gain = torch.nn.Parameter(torch.zeros(rows, num_widths, dtype=torch.float32))

    @property
    def num_widths(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[tokens, top_k, K]`` float32 logits for ``x [tokens, hidden]`` and its top-k choice."""
        rows, k, hidden = self.weight.shape
        projected = (x.float() @ self.weight.reshape(rows * k, hidden).t()).view(-1, rows, k)
        if self.kind == "layer":
            return projected + self.bias + self.gain * topk_weights.float().unsqueeze(-1)
        ids = topk_ids.long()
        per_pair = projected.gather(1, ids.unsqueeze(-1).expand(-1, -1, k))
        return per_pair + self.bias[ids] + self.gain[ids] * topk_weights.float().unsqueeze(-1)


@dataclass
class RouterSet:
    """The routers of every MoE layer of a checkpoint, with what serving needs to apply them."""

    widths: tuple[int, ...]
    kind: str
    routers: dict[int, WidthRouter]
    capacities: tuple[float, ...] | None = None
    # (shift, average width) pairs, shift ascending: the average width on the
    # calibration tokens when every logit k is lowered by shift * widths[k].
    calibration: tuple[tuple[float, float], ...] = ()
    training: dict = field(default_factory=dict)

    def save(self, model_dir: str | Path) -> Path:
        """Write ``d2moe/router.safetensors`` atomically (the expert files are not touched)."""
        path = Path(model_dir) / EXPERTS_DIR / ROUTER_FILE
        tensors = {}
        for layer, router in self.routers.items():
            for name in ("weight", "bias", "gain"):
                tensors[f"layers.{layer}.{name}"] = getattr(router, name).detach().float().contiguous()
        metadata = {
            "format_version": str(ROUTER_FORMAT_VERSION),
            "widths": json.dumps(list(self.widths)),
            "kind": self.kind,
            "capacities": json.dumps(None if self.capacities is None else list(self.capacities)),
            "calibration": json.dumps([list(c) for c in self.calibration]),
            "training": json.dumps(self.training),
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        return path

    @staticmethod
    def exists(model_dir: str | Path) -> bool:
        return (Path(model_dir) / EXPERTS_DIR / ROUTER_FILE).is_file()

    @staticmethod
    def load(model_dir: str | Path, layers: list[int] | None = None) -> "RouterSet":
        """Read the routers (all layers, or only ``layers``); errors name the file and tensor."""
        path = Path(model_dir) / EXPERTS_DIR / ROUTER_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{model_dir} has no bit-width router ({path} is missing); train one with "
                f"`d2moe train-router {model_dir}` or serve with a fixed width (width_policy 'fixed:B')"
            )
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format_version") != str(ROUTER_FORMAT_VERSION):
                    raise CheckpointError(
                        f"{path}: router format version {meta.get('format_version')!r} is not supported "
                        f"(this plugin reads version {ROUTER_FORMAT_VERSION})"
                    )
                widths = tuple(json.loads(meta["widths"]))
                kind = meta["kind"]
                capacities = json.loads(meta["capacities"])
                names = set(f.keys())
                stored = sorted({int(n.split(".")[1]) for n in names})
                routers = {}
                for layer in stored if layers is None else layers:
                    missing = [f"layers.{layer}.{t}" for t in ("weight", "bias", "gain")
                               if f"layers.{layer}.{t}" not in names]
                    if missing:
                        raise CheckpointError(f"{path}: tensor {missing[0]} is missing")
                    weight = f.get_tensor(f"layers.{layer}.weight")
                    router = WidthRouter(weight.shape[0], weight.shape[2], weight.shape[1], kind)
                    router.load_state_dict(
                        {t: f.get_tensor(f"layers.{layer}.{t}") for t in ("weight", "bias", "gain")}
                    )
                    if router.num_widths != len(widths):
                        raise CheckpointError(
                            f"{path}: layers.{layer}.weight scores {router.num_widths} widths, "
                            f"the file lists {len(widths)}"
                        )
                    routers[layer] = router.requires_grad_(False)
                return RouterSet(
                    widths=widths,
                    kind=kind,
                    routers=routers,
                    capacities=None if capacities is None else tuple(capacities),
                    calibration=tuple(tuple(c) for c in json.loads(meta.get("calibration", "[]"))),
                    training=json.loads(meta.get("training", "{}")),
                )
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path}: unreadable bit-width router file ({type(e).__name__}: {e})") from e

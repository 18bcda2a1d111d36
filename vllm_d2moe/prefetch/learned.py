"""The ``learned`` predictor: the ``gate`` predictor plus a small correction trained offline.

For each MoE layer ``l`` and each later MoE layer ``m`` it predicts (up to the
trained depth), the logits of ``m``'s router are guessed as::

    gate_m(x) + down(silu(up(x)))        x = norm_m(state of layer l)

The correction starts at zero (``down`` is zero-initialised), so an untrained
predictor is the ``gate`` predictor; training (:mod:`vllm_d2moe.prefetch.train`)
fits it to what ``m``'s router does on calibration text, from the state the
expert op of layer ``l`` sees (its normed MoE input). Routing of the guessed
logits is the model's own (:mod:`vllm_d2moe.prefetch.routing`).

File: ``d2moe/predictor.safetensors`` beside the expert blobs, tensors
``pairs.L.M.{up,down}.{weight,bias}`` (float32), and in the header metadata the
format version, depth, width, the fingerprints of the routers and of the
conversion it was trained on (a predictor trained for another model or
conversion is refused) and how it was trained.
"""

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, INDEX_NAME, CheckpointError
from vllm_d2moe.prefetch.gates import CheckpointGates
from vllm_d2moe.prefetch.predictors import GatePredictor
from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths

PREDICTOR_FILE = "predictor.safetensors"
PREDICTOR_FORMAT_VERSION = 1


class LogitCorrection(torch.nn.Module):
    """The learned correction of one (layer, later layer) pair."""

    def __init__(self, hidden: int, width: int, experts: int):
        super().__init__()
        self.up = torch.nn.Linear(hidden, width)
        self.down = torch.nn.Linear(width, experts)
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def gates_fingerprint(gates: CheckpointGates) -> str:
    """CRC32 of every router and norm weight: what a predictor was trained against."""
    crc = 0
    for layer in gates.moe_layers:
        gate = gates.gates[layer]
        for t in (gate.norm_weight, gate.gate_weight, gate.correction_bias):
            if t is not None:
                crc = zlib.crc32(t.contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def conversion_fingerprint(model_dir: str | Path) -> str:
    """CRC32 of the checkpoint's ``d2moe/index.json`` (its MWQ spec and every section checksum): the
    served experts the predictor's training states came from."""
    return f"{zlib.crc32((Path(model_dir) / EXPERTS_DIR / INDEX_NAME).read_bytes()):08x}"


def predictor_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / EXPERTS_DIR / PREDICTOR_FILE


class LearnedPredictor(GatePredictor):
    """The ``learned`` predictor (see the module docstring)."""

    def __init__(self, gates: CheckpointGates, corrections: dict[tuple[int, int], LogitCorrection], depth: int,
                 extra: int = 0, policy: ServingWidths | None = None, routers: RouterSet | None = None):
        super().__init__(gates, depth, extra, policy, routers)
        self.corrections = corrections

    @staticmethod
    def untrained(gates: CheckpointGates, depth: int, width: int) -> "LearnedPredictor":
        """Zero corrections for every (layer, later layer) pair up to ``depth``: the ``gate`` predictor."""
        probe = GatePredictor(gates, depth)
        corrections = {(layer, later): LogitCorrection(gates.hidden, width, gates.rule.num_experts)
                       for layer in gates.moe_layers for later in probe.later_layers(layer)}
        return LearnedPredictor(gates, corrections, depth)

    def logits(self, layer: int, later: int, x: torch.Tensor) -> torch.Tensor:
        return self.gates.logits(later, x) + self.corrections[(layer, later)](x)

    def save(self, model_dir: str | Path, training: dict) -> Path:
        """Write ``d2moe/predictor.safetensors`` atomically."""
        path = predictor_path(model_dir)
        tensors = {f"pairs.{layer}.{later}.{name}": t.detach().float().contiguous()
                   for (layer, later), c in self.corrections.items() for name, t in c.state_dict().items()}
        width = next(iter(self.corrections.values())).up.out_features
        metadata = {"format_version": str(PREDICTOR_FORMAT_VERSION), "depth": str(self.depth),
                    "width": str(width), "gates": gates_fingerprint(self.gates),
                    "conversion": conversion_fingerprint(model_dir), "training": json.dumps(training)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(model_dir: str | Path, depth: int, extra: int = 0,
             policy: ServingWidths | None = None) -> "LearnedPredictor":
        """Read the trained predictor of ``model_dir``; a missing, corrupt or foreign file is an error
        naming it."""
        path = predictor_path(model_dir)
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no learned expert predictor ({path} is missing); train one "
                                  f"with `d2moe train-predictor {model_dir}` or use predictor 'gate'")
        gates = CheckpointGates(model_dir)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format_version") != str(PREDICTOR_FORMAT_VERSION):
                    raise CheckpointError(f"{path}: predictor format version {meta.get('format_version')!r} is not "
                                          f"supported (this plugin reads version {PREDICTOR_FORMAT_VERSION})")
                if meta.get("gates") != gates_fingerprint(gates):
                    raise CheckpointError(f"{path} was trained for another model (router fingerprint "
                                          f"{meta.get('gates')}, this checkpoint's {gates_fingerprint(gates)}); "
                                          f"retrain it for {model_dir}")
                if meta.get("conversion") != conversion_fingerprint(model_dir):
                    raise CheckpointError(f"{path} was trained for another conversion of this model (index "
                                          f"fingerprint {meta.get('conversion')}, this checkpoint's "
                                          f"{conversion_fingerprint(model_dir)}); retrain it for {model_dir}")
                trained_depth, width = int(meta["depth"]), int(meta["width"])
                if depth > trained_depth:
                    raise CheckpointError(f"{path} predicts {trained_depth} layers ahead; prefetch depth {depth} "
                                          f"asks for more")
                predictor = LearnedPredictor.untrained(gates, depth, width)
                for (layer, later), correction in predictor.corrections.items():
                    names = [f"pairs.{layer}.{later}.{n}" for n in correction.state_dict()]
                    missing = [n for n in names if n not in f.keys()]
                    if missing:
                        raise CheckpointError(f"{path}: tensor {missing[0]} is missing")
                    correction.load_state_dict({n.split(".", 3)[3]: f.get_tensor(n) for n in names})
                    correction.requires_grad_(False)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path}: unreadable expert predictor file ({type(e).__name__}: {e})") from e
        routers = None
        if policy is not None and policy.mode != "fixed":
            routers = RouterSet.load(model_dir, layers=gates.moe_layers)
        return LearnedPredictor(gates, predictor.corrections, depth, extra, policy, routers)

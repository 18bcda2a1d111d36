"""``QuantizationConfig`` for d2moe checkpoints, registered with vLLM as ``d2moe``.

Options are keys of the checkpoint's ``quantization_config`` and can be
overridden at start-up, e.g.
``--hf-overrides '{"quantization_config": {"quant_method": "d2moe", "bits": 4}}'``:

* ``width_policy``: ``"router"``, ``"random"`` or ``"fixed:B"``; ``bits: B`` is
  shorthand for ``"fixed:B"`` (see :mod:`vllm_d2moe.width_selection`);
* ``target_bits``: average width the router holds as a running average (an online controller
  shifts its scores, :mod:`vllm_d2moe.router.controller`);
* ``slo``: ``{"tpot_ms": T}``: the widest average width whose time per output token stays
  within T, steered online (``target_bits`` then is the ceiling);
* ``capacities``: per-width fractions enforced per layer call (opt-in), or ``"off"``;
* ``memory_budget``, ``offload``, ``on_read_error``: experts streamed from disk
  through a pool of that many bytes (:mod:`vllm_d2moe.offload`);
* ``prefetch``: ``{"predictor": "gate" | "learned", "depth": d, "extra": m}``
  (depth 1, extra 0 unless given): while MoE layer ``l`` computes, the experts
  the predictor (:mod:`vllm_d2moe.prefetch`) forecasts for layers ``l+1..l+d``
  (plus ``m`` spare experts per token) are read into the pool. Needs
  ``memory_budget``; off unless set.
* ``dense``: ``"int8"``, ``"int4"`` or ``"w8a8"``: every other linear layer (attention, shared
  experts, dense MLPs, the output head unless tied; not the router gates) as weight-only
  int8 / int4, or int8 weights times activations quantized per token (vLLM's oneDNN int8 GEMM)
  (:mod:`vllm_d2moe.vllm_glue.dense_method`); unquantized unless set.

The expert layout itself comes from the checkpoint's ``d2moe/index.json``.
"""

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from vllm_d2moe.byte_sizes import parse_bytes
from vllm_d2moe.kernels import select_backend
from vllm_d2moe.mwq.checkpoint import QUANT_METHOD, MWQCheckpoint
from vllm_d2moe.offload import OffloadManager
from vllm_d2moe.offload.pipeline import OffloadPolicy
from vllm_d2moe.offload.pool import check_budget
from vllm_d2moe.prefetch.predictors import PREDICTORS, ExpertPredictor, build_predictor
from vllm_d2moe.router.controller import WidthController
from vllm_d2moe.router.model import RouterSet
from vllm_d2moe.router.policy import ServingWidths, resolve_policy
from vllm_d2moe.vllm_glue import request_faults, request_targets, width_control
from vllm_d2moe.vllm_glue.dense_method import check_dense_mode, dense_quant_method
from vllm_d2moe.width_selection import WidthSelector

# Keys the converter writes to describe the checkpoint (informational here).
_DESCRIPTIVE_KEYS = {"quant_method", "format_version", "min_bits", "max_bits", "group_size", "num_experts"}
# Runtime options a user may set.
_OPTION_KEYS = {"bits", "memory_budget", "offload", "on_read_error", "width_policy", "target_bits", "capacities",
                "slo", "prefetch", "dense"}
_PREFETCH_KEYS = {"predictor", "depth", "extra"}


def _prefetch_option(prefetch, memory_budget, policy: OffloadPolicy) -> dict | None:
    """The ``prefetch`` option checked and with its defaults; every error names the option."""
    if prefetch is None:
        return None
    if not isinstance(prefetch, dict) or set(prefetch) - _PREFETCH_KEYS or "predictor" not in prefetch:
        raise ValueError(f"d2moe option 'prefetch' must be a dict with 'predictor' and optional 'depth', 'extra', "
                         f"got {prefetch!r}")
    if memory_budget is None:
        raise ValueError("d2moe option 'prefetch' needs 'memory_budget': prefetch reads experts into the offload "
                         "pool, which only a memory budget makes (without one every expert is resident)")
    if prefetch["predictor"] not in PREDICTORS:
        raise ValueError(f"d2moe option prefetch.predictor must be one of {list(PREDICTORS)}, "
                         f"got {prefetch['predictor']!r}")
    option = {"depth": 1, "extra": 0} | prefetch
    for key in ("depth", "extra"):
        if not isinstance(option[key], int) or isinstance(option[key], bool) or option[key] < (key == "depth"):
            raise ValueError(f"d2moe option prefetch.{key} must be an integer >= {int(key == 'depth')}, "
                             f"got {option[key]!r}")
    if not (policy.overlap and policy.keep):
        raise ValueError("d2moe option 'prefetch' needs offload.overlap and offload.keep (prefetched experts are "
                         "read on the I/O threads and kept in the pool)")
    return option


@register_quantization_config(QUANT_METHOD)
class D2MoEConfig(QuantizationConfig):
    """MWQ experts served at a chosen width; every other layer stays unquantized."""

    def __init__(
        self,
        bits: int | None = None,
        width_policy: str | None = None,
        target_bits: float | None = None,
        capacities: list[float] | str | None = None,
        memory_budget: int | str | None = None,
        offload: dict | None = None,
        on_read_error: str | None = None,
        slo: dict | None = None,
        prefetch: dict | None = None,
        dense: str | None = None,
    ):
        super().__init__()
        if bits is not None and (not isinstance(bits, int) or not 1 <= bits <= 8):
            raise ValueError(f"d2moe option 'bits' must be an integer in [1, 8], got {bits!r}")
        if target_bits is not None and not isinstance(target_bits, (int, float)):
            raise ValueError(f"d2moe option 'target_bits' must be a number, got {target_bits!r}")
        if capacities is not None and capacities != "off" and not isinstance(capacities, list):
            raise ValueError(f"d2moe option 'capacities' must be a list of fractions or 'off', got {capacities!r}")
        self.requested_bits = bits
        self.dense = check_dense_mode(dense)
        self.width_options = {"width_policy": width_policy, "target_bits": target_bits, "capacities": capacities,
                              "slo": slo}
        self.checkpoint: MWQCheckpoint | None = None
        # Expert offloading (vllm_d2moe.offload): resident expert bytes, and how to stream the rest.
        self.memory_budget = (
            None if memory_budget is None else parse_bytes(memory_budget, "d2moe option 'memory_budget'")
        )
        self.offload_policy = OffloadPolicy.from_option(offload, on_read_error)
        self.prefetch = _prefetch_option(prefetch, self.memory_budget, self.offload_policy)
        self._predictor: ExpertPredictor | None = None
        self._offload: OffloadManager | None = None
        self._routers: RouterSet | None = None
        self._controller: WidthController | None = None
        self.widths: ServingWidths | None = None

    def __repr__(self) -> str:
        return f"D2MoEConfig(bits={self.requested_bits}, widths={self.widths})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "D2MoEConfig":
        unknown = set(config) - _DESCRIPTIVE_KEYS - _OPTION_KEYS
        if unknown:
            raise ValueError(
                f"unknown d2moe quantization_config option(s) {sorted(unknown)}; "
                f"options are {sorted(_OPTION_KEYS)}"
            )
        return cls(**{key: config.get(key) for key in _OPTION_KEYS})

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None):
        """Open the checkpoint's expert index and check the options against it.

        vLLM calls this while building its config in the launching process, so
        a bad option fails there, before any worker starts.
        """
        self.checkpoint = MWQCheckpoint(model_name)
        if self.requested_bits is not None:
            self.checkpoint.spec.check_width(self.requested_bits, "d2moe option 'bits'")
        self.widths = resolve_policy(
            model_name, self.checkpoint.spec, bits=self.requested_bits, **self.width_options
        )
        if self.prefetch is not None:
            self._predictor = None
            self.predictor()  # a missing, corrupt or foreign predictor file fails start-up here

    def __getstate__(self) -> dict:
        # vLLM sends this config to the engine core: the predictor (every layer's gate weights)
        # is built again there, once, rather than pickled.
        return self.__dict__ | {"_predictor": None}

    def predictor(self) -> ExpertPredictor | None:
        """The ``prefetch`` option's predictor (None without the option), built once per process;
        the gate weights are read from the checkpoint here."""
        if self.prefetch is not None and self._predictor is None:
            self._predictor = build_predictor(self.checkpoint.model_dir, self.prefetch["predictor"],
                                              self.prefetch["depth"], self.prefetch["extra"], self.widths)
        return self._predictor

    def check_memory_budget(self, parallel_config) -> None:
        """Refuse a ``memory_budget`` below what one rank's pool needs: one expert at the serving
        width, or this rank's slice of one when vLLM splits experts across ranks. Called once vLLM
        knows its parallel layout, before any worker starts (``patches.py``: ``maybe_update_config``
        is not told it)."""
        if self.memory_budget is None:
            return
        tp_size = moe_tensor_parallel_size(parallel_config)
        for entry in self.checkpoint.layers.values():
            check_budget(self.memory_budget, entry.layout, self.serving_bits, tp_size)

    def width_selector(self, layer: int, device: torch.device) -> WidthSelector:
        """The width decision of MoE layer ``layer``; the checkpoint's routers are read once per process."""
        router = None
        if self.widths.mode != "fixed":
            if self._routers is None:
                self._routers = RouterSet.load(self.checkpoint.model_dir)
                if self.widths.calibration:
                    averages = [a for _, a in self.widths.calibration]
                    request_targets.set_calibrated_range(min(averages), max(averages))
            router = self._routers.routers.get(layer)
            router = None if router is None else router.to(device)
        if self.widths.adaptive and self._controller is None:
            from vllm.distributed import get_tensor_model_parallel_world_size

            if get_tensor_model_parallel_world_size() > 1:  # each rank would time and steer its own shift
                raise ValueError("d2moe options 'target_bits' and 'slo' steer the widths online per process; "
                                 "under tensor parallelism the ranks would choose different widths: serve "
                                 "with tensor_parallel_size 1, or without them")
            self._controller = WidthController(self.widths.calibration, self.widths.target_bits, self.widths.tpot_ms)
            width_control.set_controller(self._controller)
        return WidthSelector(layer, self.widths, router, self._controller)

    def offload_manager(self, parallel, device: torch.device) -> OffloadManager:
        """The engine's one offload manager (the budget is shared by all MoE layers), made at
        the first layer's loading."""
        if self._offload is None:
            # Each rank's budget holds its own shard: its experts (EP) or its slice of each (TP).
            # A failed read fails only its requests where the scheduler sees this process's faults:
            # one rank (request_faults.py); with several, the step fails.
            one_rank = parallel.tp_size * parallel.ep_size * parallel.dp_size * parallel.pcp_size == 1
            self._offload = OffloadManager(
                self.checkpoint, self.memory_budget, self.serving_bits, self.offload_policy,
                select_backend(device.type), device, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size,
                fault_sink=request_faults.record if one_rank else None,
            )
        return self._offload

    @property
    def serving_bits(self) -> int:
        """The widest width any (token, expert) pair may be served at: what experts hold resident."""
        return self.widths.resident_bits

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts):
            from vllm_d2moe.vllm_glue.moe_method import D2MoEMethod

            return D2MoEMethod(self, layer.moe_config)
        return dense_quant_method(self.dense, layer, prefix)


def moe_tensor_parallel_size(parallel_config) -> int:
    """How many ranks split each expert, from vLLM's ``ParallelConfig``: its MoE layers shard
    experts across all tensor-, data- and prefill-context-parallel ranks, or give each rank whole
    experts under expert parallelism (``FusedMoEParallelConfig.make``)."""
    if parallel_config.enable_expert_parallel:
        return 1
    return (parallel_config.tensor_parallel_size * parallel_config.data_parallel_size
            * parallel_config.prefill_context_parallel_size)

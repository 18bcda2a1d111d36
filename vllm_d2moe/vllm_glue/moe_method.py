"""The fused-MoE method that replaces vLLM's expert path for d2moe checkpoints.

vLLM's router (the model's own scoring: softmax or sigmoid, grouped top-k,
correction bias, scaling) picks each token's experts; :meth:`D2MoEMethod.apply`
gets the hidden states with that choice and hands them to the opaque
``d2moe.moe_experts`` op, which picks each pair's width
(``vllm_d2moe.width_selection``) and computes the MWQ experts. Shared experts
and the tensor-parallel all-reduce stay with vLLM's MoE runner.
"""

import re

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from vllm_d2moe.experts import load_layer_experts
from vllm_d2moe.kernels import select_backend
from vllm_d2moe.offload.pipeline import Forecasts
from vllm_d2moe.prefetch.predictors import ExpertPredictor
from vllm_d2moe.vllm_glue.expert_op import moe_experts, register_layer
from vllm_d2moe.vllm_glue.metrics import start_publishing
from vllm_d2moe.width_selection import WidthSelector

logger = init_logger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _refuse_checkpoint_expert(param, loaded_weight, weight_name, **_):
    raise ValueError(
        f"checkpoint tensor {weight_name} holds unquantized expert weights, but d2moe reads "
        f"experts from d2moe/; convert the model with `d2moe convert SRC DST` first"
    )


class D2MoEMethod(FusedMoEMethodBase):
    def __init__(self, quant_config, moe: FusedMoEConfig):
        super().__init__(moe)
        self.quant_config = quant_config
        self.experts = None  # this rank's LayerExperts, set after loading
        self.width_selector: WidthSelector | None = None
        self.predictor: ExpertPredictor | None = None  # the prefetch option's, under a memory budget
        self.layer_id: int | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        if layer.activation != MoEActivation.SILU:
            raise ValueError(
                f"{layer.layer_name}: d2moe supports SwiGLU (silu) experts, "
                f"not activation {layer.activation.value!r}"
            )
        if getattr(layer, "apply_router_weight_on_input", False) or self.moe.has_bias:
            raise ValueError(
                f"{layer.layer_name}: d2moe does not support expert biases or "
                f"router weights applied on the input"
            )
        match = _LAYER_INDEX.search(layer.layer_name + ".")
        if match is None:
            raise ValueError(f"d2moe: cannot tell the layer index of MoE layer {layer.layer_name}")
        self.layer_index = int(match.group(1))
        self.intermediate_size_per_partition = intermediate_size_per_partition
        # Expert weights are read from d2moe/ after loading; these empty
        # placeholders only make any unconverted expert tensor a clear error.
        for name in ("w13_weight", "w2_weight"):
            param = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": _refuse_checkpoint_expert})
            layer.register_parameter(name, param)
        if self.quant_config.checkpoint is None:
            model = get_current_vllm_config().model_config.model
            self.quant_config.maybe_update_config(model)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        checkpoint = self.quant_config.checkpoint
        entry = checkpoint.layer(self.layer_index)
        if entry.num_experts != layer.global_num_experts:
            raise ValueError(
                f"{layer.layer_name}: the model has {layer.global_num_experts} experts, "
                f"the d2moe checkpoint's layer {self.layer_index} has {entry.num_experts}"
            )
        if layer.expert_map is None:
            global_ids = list(range(layer.global_num_experts))
        else:
            local = layer.expert_map.tolist()
            global_ids = sorted((i for i, local_id in enumerate(local) if local_id >= 0), key=local.__getitem__)
        parallel = self.moe.moe_parallel_config
        device = torch.device(self.moe.device) if self.moe.device else torch.device("cpu")
        if self.quant_config.memory_budget is None:
            experts = load_layer_experts(
                checkpoint,
                self.layer_index,
                global_ids,
                self.quant_config.serving_bits,
                parallel.tp_rank,
                parallel.tp_size,
                select_backend(device.type),
                device,
            )
        else:  # streamed from disk through the engine's offload pool
            experts = self.quant_config.offload_manager(parallel, device).layer(
                self.layer_index, global_ids, self.quant_config.serving_bits
            )
        # From the layout, not an expert: an offloaded layer has read none yet.
        per_rank = entry.layout.intermediate // parallel.tp_size
        if per_rank != self.intermediate_size_per_partition:
            raise ValueError(
                f"{layer.layer_name}: checkpoint experts give intermediate size "
                f"{per_rank} per rank, vLLM expects {self.intermediate_size_per_partition}"
            )
        self.experts = experts
        self.predictor = self.quant_config.predictor()
        self.width_selector = self.quant_config.width_selector(self.layer_index, device)
        self.layer_id = register_layer(self)
        # Counters out to Prometheus (/metrics); width choices are the same on every TP rank.
        start_publishing(publish_widths=parallel.tp_rank == 0)
        logger.debug(
            "d2moe: %s holds %d experts at %d bits (%.1f MiB), widths by %s",
            layer.layer_name, len(global_ids), experts.bits, experts.nbytes / 2**20, self.quant_config.widths,
        )

    def forecasts(self, x: torch.Tensor, token_targets: torch.Tensor | None) -> Forecasts:
        """What the next MoE layers are predicted to need, from this layer's MoE input ``x``: per later
        layer and depth, each predicted expert's token count and widest width (on the host, where the
        predictor's gate weights are)."""
        targets = None if token_targets is None else token_targets.cpu()
        predicted = self.predictor.predict_from_moe_input(self.layer_index, x.detach().cpu(), targets)
        return [(f.layer, f.depth, f.per_expert()) for f in predicted]

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> FusedMoEQuantConfig:
        return FusedMoEQuantConfig.make()

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input=None,
    ) -> torch.Tensor:
        local_ids = topk_ids if layer.expert_map is None else layer.expert_map[topk_ids.long()]
        return moe_experts(x, topk_weights, topk_ids, local_ids, self.layer_id)

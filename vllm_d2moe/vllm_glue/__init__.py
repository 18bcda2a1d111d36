"""vLLM integration: the ``d2moe`` quantization config, its fused-MoE method,
and the opaque custom op that runs the experts."""

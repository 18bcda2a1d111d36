"""D²MoE's second routing decision: a learned bit-width router per MoE layer.

``model``: the router network and its file in a d2moe checkpoint;
``assign``: from router scores to widths (capacities, target-bits shift);
``policy``: the width options resolved (:class:`~vllm_d2moe.router.policy.ServingWidths`)
and the per-pair choice under them;
``simulate``: the same choices in a transformers model (training, cross-checks);
``loss`` and ``train``: the offline trainer behind ``d2moe train-router``.
Serving applies it in :mod:`vllm_d2moe.width_selection`.
"""

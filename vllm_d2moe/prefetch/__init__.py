"""Expert prediction for cross-layer prefetch: which experts, at which widths,
the next MoE layers will need, guessed from the current hidden state.

``routing``: each architecture's top-k rule as vLLM serves it; ``gates``: a
checkpoint's routers and the norms in front of them; ``predictors``: the
predictor interface, the ``gate`` predictor and the choice by name;
``learned``: the ``gate`` predictor plus a trained correction, and its file;
``capture``: a transformers model's MoE inputs and routing, by hooks;
``train``: the offline trainer of ``learned``; ``recall``: how well a
prediction covers what was routed (``benchmarks/prefetch_recall.py``).
No module here imports vLLM.
"""

"""Accuracy harness (``d2moe eval``): held-out perplexity, KL divergence and
top-1 agreement of MWQ widths and baseline quantizers, measured through vLLM.

* ``heldout``: the fixed, deterministic token windows every model is scored on,
* ``fake_quant``: the baselines (independent round-to-nearest per width,
  per-channel INT8) written as "fake-quantized" Hugging Face checkpoints,
* ``variants``: the served models compared and their bits per weight,
* ``scoring``: vLLM prompt-logprob scoring in a subprocess (per-token NLL, KL
  and top-1 agreement against the unquantized model),
* ``crosscheck``: the same perplexity from a plain transformers forward pass,
* ``report``: markdown table, JSON and plot,
* ``peer_engines``: whether the engines ``benchmarks/peers.py`` compares with are installed,
* ``harness``: the ``d2moe eval`` command,
* ``zero_shot``: a next-line multiple-choice task for the lm-eval harness.
"""

"""A zero-shot next-lines multiple-choice task built from the corpus's test split,
for the lm-eval harness (``python -m vllm_d2moe.eval.zero_shot OUT_DIR``)."""

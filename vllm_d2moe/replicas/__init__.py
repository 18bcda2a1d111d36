"""Data-parallel vLLM replicas as Ray actors on one machine, behind one entry point.

``spec``: what one replica runs and on which core; ``cluster``: the local Ray
cluster a command starts and stops; ``batch``: ``d2moe ray-batch`` (JSONL in,
JSONL out, failed replicas' prompts retried elsewhere); ``serving``: ``d2moe
ray-serve`` (one OpenAI server per replica behind ``front``, a load-balancing
HTTP proxy).

vLLM's own Ray executor shards *one* model over several GPUs and refuses
vLLM's CPU platform; these replicas each run a whole engine with the
single-process ("uni") executor, so they work on CPU cores as on GPUs.
"""

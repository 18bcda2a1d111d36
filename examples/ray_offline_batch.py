"""Offline batch over two data-parallel vLLM replicas (Ray actors, one CPU core each).

    bash scripts/install.sh ray          # vLLM (CPU) + this plugin + Ray
    python examples/ray_offline_batch.py [--replicas 2] [--replica-bits 8,4]

Converts the embedded reference model to MWQ (cached, as `d2moe demo` does),
writes a JSONL of prompts, runs it through the replicas (progress bar, results
in input order) and prints the completions. Each replica has its own options:
``--replica-bits 8,4`` serves replica 0 at 8 bits and replica 1 at 4 bits
through ``hf_overrides["quantization_config"]``, the same place any per-replica
option (e.g. a memory budget) goes. The same run from the command line:

    d2moe ray-batch CKPT --quantization d2moe --replicas 2 --enforce-eager \\
        --input prompts.jsonl --output completions.jsonl --max-tokens 32

The local Ray cluster it starts is shut down at the end; nothing else is touched.
"""

import argparse
import json
import tempfile
from pathlib import Path

from vllm_d2moe.demo import DEFAULT_PROMPTS, EMBEDDED_MODEL, converted_checkpoint
from vllm_d2moe.mwq.quantize import MWQSpec
from vllm_d2moe.reference.corpus import cache_root
from vllm_d2moe.replicas.batch import run_batch
from vllm_d2moe.replicas.spec import ReplicaSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--replica-bits", default=None, help="serving width of each replica, e.g. 8,4")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    checkpoint = converted_checkpoint(EMBEDDED_MODEL, cache_root() / "demo", MWQSpec(2, 8, 128))
    widths = [int(b) for b in args.replica_bits.split(",")] if args.replica_bits else [8] * args.replicas
    specs = [
        ReplicaSpec(
            str(checkpoint),
            core=i,
            quantization="d2moe",
            enforce_eager=True,
            max_model_len=512,
            hf_overrides={"quantization_config": {"quant_method": "d2moe", "bits": bits}},
        )
        for i, bits in enumerate(widths)
    ]
    workdir = Path(tempfile.mkdtemp(prefix="d2moe-ray-batch-"))
    records = [{"id": i, "prompt": p} for i, p in enumerate(DEFAULT_PROMPTS * 3)]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = workdir / "completions.jsonl"
    pool = run_batch(
        records, str(output), specs, {"max_tokens": args.max_tokens, "temperature": 0.0}, chunk_size=2
    )
    for line in output.read_text().splitlines():
        record = json.loads(line)
        print(
            f"[{record['id']:2d}] replica {record['replica']} ({widths[record['replica']]} bits): "
            f"{record['prompt']!r} -> {record['text']!r}"
        )
    print(f"input {workdir / 'prompts.jsonl'}, output {output}; failed replicas: {pool.failures or 'none'}")


if __name__ == "__main__":
    main()

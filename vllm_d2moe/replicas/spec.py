"""What one replica runs (model, options such as a memory budget) and on which core."""

import json
import os
from dataclasses import dataclass, field

from vllm_d2moe.vllm_glue.llm import ENGINE_ENV

# A replica's engine core runs inside its actor's process, not vLLM's default spawned
# ones (engine core and, on CPU, an mp worker): one PID per replica, which Ray kills
# or restarts as a whole and which holds only the core it is bound to, and one vLLM
# import per replica instead of three.
REPLICA_ENGINE_ENV = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class ReplicaSpec:
    model: str
    core: int  # the CPU core vLLM binds this replica's threads to
    quantization: str | None = None
    # Per replica: e.g. {"quantization_config": {"quant_method": "d2moe", "bits": 4}},
    # or a memory budget option of quantization_config.
    hf_overrides: dict = field(default_factory=dict)
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.3  # on CPU: the share of memory vLLM may reserve
    seed: int = 0

    def runtime_env(self) -> dict:
        """Ray runtime environment of this replica's actor (read by vLLM at import)."""
        return {"env_vars": {**REPLICA_ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(self.core)}}

    def llm_kwargs(self) -> dict:
        """Arguments of ``vllm.LLM`` for this replica."""
        return dict(
            model=self.model,
            quantization=self.quantization,
            hf_overrides=self.hf_overrides or None,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
            distributed_executor_backend="uni",
            seed=self.seed,
        )

    def serve_args(self) -> list[str]:
        """The same engine options as ``d2moe serve`` (``vllm serve``) arguments."""
        args = [
            self.model,
            "--dtype",
            self.dtype,
            "--seed",
            str(self.seed),
            "--gpu-memory-utilization",
            str(self.gpu_memory_utilization),
            "--distributed-executor-backend",
            "uni",
        ]
        if self.quantization:
            args += ["--quantization", self.quantization]
        if self.hf_overrides:
            args += ["--hf-overrides", json.dumps(self.hf_overrides)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args


def add_replica_arguments(parser) -> None:
    """Options shared by ``d2moe ray-batch`` and ``d2moe ray-serve``."""
    parser.add_argument("model", help="model directory (a d2moe checkpoint or any vLLM model)")
    parser.add_argument("--replicas", type=int, default=2, help="number of replicas (default 2)")
    parser.add_argument(
        "--cores",
        default=None,
        help="comma-separated CPU core of each replica (default: 0, 1, ... modulo the cores)",
    )
    parser.add_argument("--quantization", default=None, help="e.g. d2moe (default: from config.json)")
    parser.add_argument(
        "--hf-overrides",
        type=json.loads,
        default={},
        help="JSON given to every replica as vLLM's hf_overrides",
    )
    parser.add_argument(
        "--replica-hf-overrides",
        type=json.loads,
        default=None,
        help="JSON list with one hf_overrides dict per replica (replaces --hf-overrides), "
        "e.g. a different quantization_config budget per replica",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)


def specs_from_args(args) -> list[ReplicaSpec]:
    """One spec per replica from the options of :func:`add_replica_arguments`."""
    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if args.cores:
        cores = [int(c) for c in args.cores.split(",")]
    else:
        cores = [i % os.cpu_count() for i in range(args.replicas)]
    overrides = args.replica_hf_overrides or [args.hf_overrides] * args.replicas
    if len(cores) != args.replicas or len(overrides) != args.replicas:
        raise ValueError(f"--cores and --replica-hf-overrides need one entry per replica ({args.replicas})")
    return [
        ReplicaSpec(
            model=args.model,
            core=core,
            quantization=args.quantization,
            hf_overrides=hf,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization,
            seed=args.seed,
        )
        for core, hf in zip(cores, overrides)
    ]

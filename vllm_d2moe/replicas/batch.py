"""``d2moe ray-batch``: a JSONL file of prompts through data-parallel vLLM replicas.

Each input line is a JSON object with a ``"prompt"``; each output line is that
object plus the completion (``text``, ``token_ids``, ``finish_reason``) and the
index of the ``replica`` that produced it, in input order. Prompts go out in
chunks, one chunk in flight per replica, so faster replicas take more chunks;
when a replica dies (or never starts), its chunk goes to another replica.

A chunk whose ``generate`` raised (a ``RayTaskError``: the replica lives on) is
tried once more on another replica; its lines then say what failed in
``failures`` (``[{"replica", "error"}]``). When the retry fails too, or no
other replica is left to try, its prompts' lines carry ``error`` (the last
failure) and ``failures`` instead of a completion, and the batch goes on.
"""

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from vllm_d2moe.replicas.cluster import failure_reason, import_ray, local_cluster
from vllm_d2moe.replicas.spec import ReplicaSpec, add_replica_arguments, specs_from_args
from vllm_d2moe.vllm_glue.llm import start_llm

logger = logging.getLogger(__name__)


class BatchReplica:
    """One vLLM engine in its Ray actor's own process (wrapped by :class:`ReplicaPool`)."""

    def __init__(self, spec: ReplicaSpec):
        self.llm = start_llm(**spec.llm_kwargs())

    def generate(self, prompts: list[str], sampling: dict) -> list[dict]:
        from vllm import SamplingParams

        outputs = self.llm.generate(prompts, SamplingParams(**sampling), use_tqdm=False)
        return [
            {"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
            for c in (o.outputs[0] for o in outputs)
        ]


class NoReplicaLeft(RuntimeError):
    pass


# Tries of a chunk whose task failed (replicas that died do not count: their chunks always move on).
TASK_TRIES = 2


@dataclass
class Chunk:
    start: int  # index of its first prompt
    failures: dict[int, str] = field(default_factory=dict)  # replica -> why its task failed there

    def failure_records(self) -> list[dict]:
        return [{"replica": replica, "error": error} for replica, error in self.failures.items()]


class ReplicaPool:
    """Batch replicas as Ray actors (one CPU each), started at once, engines loading in parallel."""

    def __init__(self, specs: list[ReplicaSpec]):
        ray = import_ray()
        actor = ray.remote(num_cpus=1)(BatchReplica)
        self.actors = [actor.options(runtime_env=s.runtime_env()).remote(s) for s in specs]
        self.failures: dict[int, str] = {}  # replica -> why it was dropped
        self.retried_chunks = 0  # chunks of replicas that died, sent to another
        self.task_failures = 0  # generate calls that raised
        self.failed_prompts = 0  # prompts without a completion (every try failed)

    def generate(self, prompts: list[str], sampling: dict, chunk_size: int) -> Iterator[tuple[int, dict]]:
        """``(prompt index, result)`` pairs in completion order."""
        ray = import_ray()
        todo = [Chunk(start) for start in range(0, len(prompts), chunk_size)]
        in_flight: dict = {}  # ObjectRef -> (replica, chunk)

        def dispatch() -> None:
            """Give each idle live replica the first chunk it has not failed yet."""
            busy = {replica for replica, _ in in_flight.values()}
            for replica in range(len(self.actors)):
                if replica in busy or replica in self.failures:
                    continue
                chunk = next((c for c in todo if replica not in c.failures), None)
                if chunk is not None:
                    todo.remove(chunk)
                    ref = self.actors[replica].generate.remote(
                        prompts[chunk.start : chunk.start + chunk_size], sampling
                    )
                    in_flight[ref] = (replica, chunk)

        def failed(chunk: Chunk) -> list[tuple[int, dict]]:
            """Its prompts' results: ``error`` (the last failure) and ``failures`` (every replica tried)."""
            size = len(prompts[chunk.start : chunk.start + chunk_size])
            self.failed_prompts += size
            logger.error("prompts %d-%d failed on every replica tried: %s", chunk.start,
                         chunk.start + size - 1, chunk.failures)
            result = {"error": list(chunk.failures.values())[-1], "failures": chunk.failure_records()}
            return [(chunk.start + offset, result) for offset in range(size)]

        dispatch()
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            replica, chunk = in_flight.pop(ref)
            done: list[tuple[int, dict]] = []
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._drop(replica, e)
                todo.insert(0, chunk)
                self.retried_chunks += 1
            except ray.exceptions.RayTaskError as e:
                self.task_failures += 1
                chunk.failures[replica] = failure_reason(e)
                logger.warning("replica %d failed prompts %d..: %s", replica, chunk.start, chunk.failures[replica])
                if len(chunk.failures) < TASK_TRIES:
                    todo.insert(0, chunk)
                else:
                    done = failed(chunk)
            else:
                extra = {"failures": chunk.failure_records()} if chunk.failures else {}
                done = [(chunk.start + offset, {**result, "replica": replica, **extra})
                        for offset, result in enumerate(results)]
            dispatch()  # before handing results out: the replicas work while the caller writes
            yield from done
        if todo and len(self.failures) == len(self.actors):
            raise NoReplicaLeft(f"every replica failed: {self.failures}")
        for chunk in todo:  # every live replica has failed it already
            yield from failed(chunk)

    def _drop(self, replica: int, error: Exception) -> None:
        reason = failure_reason(error)
        self.failures[replica] = reason
        logger.warning("replica %d failed (%s); its prompts go to the other replicas", replica, reason)
        import_ray().kill(self.actors[replica])  # frees its CPU if it is only unreachable

    def close(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor)


def in_input_order(pairs: Iterable[tuple[int, dict]]) -> Iterator[dict]:
    """Results of ``(index, result)`` pairs, in index order, each as soon as its predecessors are done."""
    waiting: dict[int, dict] = {}
    next_index = 0
    for index, result in pairs:
        waiting[index] = result
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1


def read_records(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'prompt'")
            records.append(record)
    return records


def run_batch(
    records: list[dict],
    output_path: str,
    specs: list[ReplicaSpec],
    sampling: dict,
    chunk_size: int = 8,
    show_replica_logs: bool = False,
) -> ReplicaPool:
    """Write every record plus its completion to ``output_path`` (JSONL, input order)."""
    prompts = [r["prompt"] for r in records]
    with local_cluster(len(specs), show_replica_logs), open(output_path, "w") as out:
        pool = ReplicaPool(specs)
        try:
            with tqdm(total=len(prompts), unit="prompt", desc=f"{len(specs)} replicas") as bar:

                def counted(pairs):
                    for index, result in pairs:
                        bar.update(1)
                        yield index, {**records[index], **result}

                for record in in_input_order(counted(pool.generate(prompts, sampling, chunk_size))):
                    out.write(json.dumps(record) + "\n")
        finally:
            pool.close()
    return pool


def add_arguments(parser) -> None:
    add_replica_arguments(parser)
    parser.add_argument("--input", required=True, help='JSONL file, one {"prompt": ...} object a line')
    parser.add_argument("--output", required=True, help="JSONL file written in input order")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per request to a replica")
    parser.add_argument("--show-replica-logs", action="store_true", help="print vLLM's logs of every replica")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        specs = specs_from_args(args)
        records = read_records(args.input)
    except (ValueError, OSError) as e:
        print(f"d2moe ray-batch: error: {e}", file=sys.stderr)
        return 2
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    try:
        pool = run_batch(records, args.output, specs, sampling, args.chunk_size, args.show_replica_logs)
    except NoReplicaLeft as e:
        print(f"d2moe ray-batch: error: {e}", file=sys.stderr)
        return 1
    notes = []
    if pool.failures:
        notes.append(f"{len(pool.failures)} replica(s) failed, {pool.retried_chunks} chunk(s) retried")
    if pool.task_failures:
        notes.append(f"{pool.task_failures} generate call(s) raised (their lines list them in 'failures')")
    if pool.failed_prompts:
        notes.append(f"{pool.failed_prompts} prompt(s) failed on every replica tried (lines with 'error')")
    print(
        f"{len(records) - pool.failed_prompts} of {len(records)} completions written to {args.output}"
        + "".join(f"; {note}" for note in notes),
        file=sys.stderr,
    )
    return 1 if pool.failed_prompts else 0

"""A soak run: ``d2moe serve`` under concurrent OpenAI clients while faults are injected, every answer checked.

The requests (:func:`soak_requests`) are a fixed set: completions streamed and not, ``n=2``, stop
strings, log-probs, chat, a very long prompt, one beyond the context, empty ones, and requests
the client abandons (a stream closed after its first chunks, a request cancelled while it runs).
Every request but the abandoned ones is greedy (``n=2``: seeded sampling, since vLLM refuses
greedy ``n > 1``), so its outcome has one right value: the one an all-resident server gives it
sent alone (:func:`expected_outcomes`). Concurrent clients (:func:`soak`) then send them in
random order at a server that streams experts from disk, while :class:`Fault` events damage a
copy of the checkpoint it serves or switch the store's injected read faults
(:mod:`vllm_d2moe.offload.injected_faults`). Each answer is classified:

- ``ok``: what the alone run gave (text and finish reason of every choice, or the same HTTP error);
- ``failed_by_fault``: an error naming an expert (``MoE layer L expert E``) that a fault had hit;
- ``wrong``: a different answer; ``unexplained``: any other failure; ``lost``: no answer in time.

The last three must stay at 0. The server's resident memory (its process tree) and the offload
pool's bytes (``/metrics``) are sampled throughout; the server must be alive and healthy at the end.
"""

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_d2moe.cpu_setup import RESERVED_CPUS_ENV, THREADS_BIND_ENV, reserved_cpus_to_share
from vllm_d2moe.mwq.checkpoint import EXPERTS_DIR, MWQCheckpoint, layer_file
from vllm_d2moe.offload.injected_faults import ENV_VARIABLE as FAULTS_ENV
from vllm_d2moe.testing.damage import flip_byte
from vllm_d2moe.testing.served import healthy

ABANDONED_KINDS = ("abandon_stream", "cancel")  # not checked: the client walks away
EXPERT_NAMED = re.compile(r"MoE layer (\d+) expert (\d+)")

PROMPT_SEEDS = [
    "def parse_args(argv):\n",
    "import json\n\nclass",
    "The parser reads",
    "return self.",
    "The kernel module",
    "static int __init",
    "To install the package, run",
    "Memory management in Linux",
    "The following example shows how to",
    "    for line in",
    "Returns a new list",
    "The scheduler decides",
]
LONG_PARAGRAPH = (
    "The module provides functions to read and write files, to create and remove directories, and to "
    "walk a directory tree. Each function raises an exception when the operating system reports an error. "
)


@dataclass(frozen=True)
class SoakRequest:
    kind: str  # which shape of request (completion, stream, n2, stop, logprobs, chat, long, ...)
    body: tuple  # the request's arguments besides the model, as sorted (key, JSON value) pairs

    @classmethod
    def make(cls, kind: str, **body) -> "SoakRequest":
        return cls(kind, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in body.items())))

    @property
    def arguments(self) -> dict:
        return {k: json.loads(v) for k, v in self.body}

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.body])

    @property
    def checked(self) -> bool:
        return self.kind not in ABANDONED_KINDS


def soak_requests(max_model_len: int, targets: tuple[float, ...] = ()) -> list[SoakRequest]:
    """The fixed request set; with ``targets``, each greedy request once per per-request target
    bit-width (``vllm_xargs``: the router serves it at that average width)."""
    greedy = []
    for i, prompt in enumerate(PROMPT_SEEDS):
        tokens = 12 + 4 * (i % 4)
        greedy += [
            SoakRequest.make("completion", prompt=prompt, max_tokens=tokens, temperature=0),
            SoakRequest.make("stream", prompt=prompt, max_tokens=tokens, temperature=0, stream=True),
        ]
        if i % 2 == 0:
            # vLLM refuses n > 1 with greedy sampling; seeded sampling has one right answer too.
            greedy.append(SoakRequest.make("n2", prompt=prompt, max_tokens=tokens, temperature=0.8, seed=i, n=2))
            greedy.append(SoakRequest.make("stop", prompt=prompt, max_tokens=32, temperature=0, stop=["\n", "."]))
        else:
            greedy.append(SoakRequest.make("logprobs", prompt=prompt, max_tokens=tokens, temperature=0, logprobs=2))
            greedy.append(SoakRequest.make("chat", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=tokens, temperature=0))
    # About 5.5 characters a token on this text (embedded tokenizer): the long prompt fills most of the context,
    # the one beyond it must be refused, as it is alone.
    repeats = max_model_len * 9 // 2 // len(LONG_PARAGRAPH)
    greedy += [
        SoakRequest.make("long", prompt=LONG_PARAGRAPH * repeats, max_tokens=8, temperature=0),
        SoakRequest.make("too_long", prompt=LONG_PARAGRAPH * repeats * 3, max_tokens=8, temperature=0),
        SoakRequest.make("empty", prompt="", max_tokens=8, temperature=0),
        SoakRequest.make("empty_chat", messages=[{"role": "user", "content": ""}], max_tokens=8, temperature=0),
    ]
    if targets:
        greedy = [SoakRequest.make(r.kind, **r.arguments, extra_body={"vllm_xargs": {"d2moe_target_bits": t}})
                  for r in greedy for t in targets]
    abandoned = [
        SoakRequest.make("abandon_stream", prompt=prompt, max_tokens=48, temperature=0.8, stream=True)
        for prompt in PROMPT_SEEDS[:4]
    ] + [SoakRequest.make("cancel", prompt=prompt, max_tokens=48, temperature=0.8) for prompt in PROMPT_SEEDS[4:8]]
    return greedy + abandoned


async def send(client, model: str, request: SoakRequest) -> dict:
    """The request's outcome: ``{"status": 200, "texts": [...], "finish": [...]}`` per choice, or
    ``{"status": code, "error": message}`` for an HTTP error or an error event of a stream."""
    import openai

    args = request.arguments
    chat = "messages" in args
    create = client.chat.completions.create if chat else client.completions.create
    try:
        if request.kind == "abandon_stream":
            stream = await create(model=model, **args)
            chunks = 0
            async for _ in stream:
                chunks += 1
                if chunks == 2:
                    break
            await stream.close()  # the client disconnects mid-stream
            return {"status": 200, "abandoned_after_chunks": chunks}
        if args.get("stream"):
            texts, finish = {}, {}
            async for chunk in await create(model=model, **args):
                for choice in chunk.choices:
                    piece = choice.delta.content if chat else choice.text
                    texts[choice.index] = texts.get(choice.index, "") + (piece or "")
                    if choice.finish_reason:
                        finish[choice.index] = choice.finish_reason
            return {"status": 200, "texts": [texts[i] for i in sorted(texts)],
                    "finish": [finish.get(i) for i in sorted(texts)]}
        reply = await create(model=model, **args)
        choices = sorted(reply.choices, key=lambda c: c.index)
        if args.get("logprobs") and any(c.logprobs is None or len(c.logprobs.tokens) == 0 for c in choices):
            return {"status": 200, "error": "log-probs missing from the reply"}
        return {"status": 200, "texts": [c.message.content if chat else c.text for c in choices],
                "finish": [c.finish_reason for c in choices]}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "error": str(e)}
    except openai.APIConnectionError as e:
        return {"status": None, "error": f"{e} ({type(e.__cause__).__name__}: {e.__cause__})"}
    except openai.APIError as e:  # an error event inside a stream (HTTP 200)
        return {"status": 200, "error": str(e)}


def expected_outcomes(base_url: str, model: str, requests: list[SoakRequest], timeout_s: float = 300) -> dict:
    """Each checked request sent alone, one after the other: ``{key: outcome}``."""
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
        try:
            return {r.key: await send(client, model, r) for r in requests if r.checked}
        finally:
            await client.close()

    outcomes = asyncio.run(run())
    broken = {k: o for k, o in outcomes.items() if (o["status"] or 500) >= 500 or (o["status"] == 200 and "error" in o)}
    if broken:
        raise RuntimeError(f"the all-resident reference server failed requests: {broken}")
    return outcomes


def reference_cache_key(model_dir: Path, server_args: dict, requests: list[SoakRequest]) -> str:
    """What the expected outcomes depend on: the checkpoint's index (and router), the serving
    options, the requests."""
    digest = hashlib.sha256()
    d2moe = Path(model_dir) / EXPERTS_DIR
    for name in ("index.json", "router.safetensors"):
        if (d2moe / name).exists():
            digest.update((d2moe / name).read_bytes())
    digest.update(json.dumps(server_args, sort_keys=True).encode())
    digest.update("\n".join(r.key for r in requests).encode())
    return digest.hexdigest()[:16]


# --- faults ------------------------------------------------------------------------------------


def write_injected_faults(path: Path, delay_s: float = 0.0, fail: tuple[tuple[int, int], ...] = ()) -> None:
    """The store's injected read faults, written whole (the store re-reads the file when it changes)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"delay_s": delay_s, "fail": [list(e) for e in fail]}))
    os.replace(tmp, path)


FAULT_KINDS = ("delay", "read_error", "remove_file", "corrupt", "truncate")


@dataclass
class Fault:
    """One event of the run: ``apply()`` at ``at`` (a fraction of the run's duration), ``undo()``
    (if any) at ``until``. ``experts`` are those a failure may name because of it: ``(layer, expert)``."""

    name: str
    at: float
    apply: Callable[[], None]
    experts: tuple[tuple[int, int], ...] = ()
    until: float | None = None
    undo: Callable[[], None] | None = None
    applied_s: float | None = None


def standard_faults(model_dir: Path, control: Path, section: int, at: dict[str, float] | None = None,
                    kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """The faults of ``kinds`` (default: every kind), in a run's order (``at``: fractions of the
    run overriding the default schedule, by kind): reads delayed, then read errors of one layer's
    experts (both through the store's injected faults, and ended again; an expert the pool holds
    is not read, so a whole layer, not one expert that may stay resident), an expert file removed (nothing
    may change: the store reads through descriptors opened at start), then lasting damage on the
    copy served: section ``section`` of one expert corrupt, and the last layer's file cut off
    inside that section of the expert stored last in it (``section``: the widest plane the served
    widths read, so that only requests whose pairs need it fail). Where to damage is found now,
    before the file is removed. Requests the client abandons run throughout."""
    at = {"delay": 0.10, "read_error": 0.30, "remove_file": 0.45, "corrupt": 0.80, "truncate": 0.90, **(at or {})}
    checkpoint = MWQCheckpoint(model_dir)
    layers = sorted(checkpoint.layers)
    error_layer = layers[min(1, len(layers) - 1)]
    errors = tuple((error_layer, e) for e in range(checkpoint.layer(error_layer).num_experts))
    removed = Path(model_dir) / EXPERTS_DIR / layer_file(layers[0])
    corrupt = (layers[min(2, len(layers) - 1)], 3)
    corrupt_path, corrupt_offset, _ = checkpoint.expert_extent(*corrupt)
    corrupt_offset += checkpoint.layer(corrupt[0]).layout.section_range(section)[0]
    last = layers[-1]
    stored_last = max(range(checkpoint.layer(last).num_experts), key=lambda e: checkpoint.expert_extent(last, e)[1])
    truncated = (last, stored_last)
    truncated_path, truncated_offset, _ = checkpoint.expert_extent(*truncated)
    truncated_offset += checkpoint.layer(last).layout.section_range(section)[0] + 1
    checkpoint.blob_files().close()

    def clear():
        write_injected_faults(control)

    faults = dict(zip(FAULT_KINDS, [
        Fault("store delays every read by 20 ms", at["delay"], lambda: write_injected_faults(control, delay_s=0.02),
              until=at["delay"] + 0.15, undo=clear),
        Fault(f"store read errors of every layer-{error_layer} expert", at["read_error"],
              lambda: write_injected_faults(control, fail=errors), experts=errors,
              until=at["read_error"] + 0.10, undo=clear),
        Fault(f"expert file {removed.name} removed", at["remove_file"], removed.unlink),
        Fault(f"section {section} of layer {corrupt[0]} expert {corrupt[1]} corrupt", at["corrupt"],
              lambda: flip_byte(corrupt_path, corrupt_offset), experts=(corrupt,)),
        Fault(f"{layer_file(last)} truncated into section {section} of expert {truncated[1]}", at["truncate"],
              lambda: os.truncate(truncated_path, truncated_offset), experts=(truncated,)),
    ], strict=True))
    return [faults[kind] for kind in kinds]


# --- the run -----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    config: dict
    records: list[dict] = field(default_factory=list)  # one per request sent
    samples: list[dict] = field(default_factory=list)  # RSS, pool bytes, health over time
    faults: list[dict] = field(default_factory=list)
    alive_at_end: bool = False
    healthy_at_end: bool = False

    def summary(self, warmup_fraction: float = 0.25) -> dict:
        counts = Counter(r["outcome"] for r in self.records)
        by_kind = {}
        for r in self.records:
            by_kind.setdefault(r["kind"], Counter())[r["outcome"]] += 1
        latencies = sorted(r["end_s"] - r["start_s"] for r in self.records
                           if r["outcome"] in ("ok", "failed_by_fault") and r["kind"] not in ABANDONED_KINDS)
        duration = self.config["duration_s"]
        warm = [s for s in self.samples if s["t_s"] >= warmup_fraction * duration]
        pool_ok = all(s.get("pool_occupied", 0) <= s.get("pool_allocated", 0) <= s["pool_budget"]
                      for s in self.samples if s.get("pool_budget"))
        violations = [f"{counts[o]} {o}" for o in ("wrong", "unexplained", "lost") if counts[o]]
        if not pool_ok:
            violations.append("pool occupancy beyond its allocation or budget")
        if not (self.alive_at_end and self.healthy_at_end):
            violations.append("server not alive and healthy at the end")
        return {
            "requests": len(self.records),
            "outcomes": dict(counts),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "failures_by_fault": Counter(r["fault"] for r in self.records if r["outcome"] == "failed_by_fault"),
            "latency_s": percentiles(latencies),
            "rss": rss_growth(warm),
            "anon": rss_growth(warm, "anon_bytes"),
            "pool_max": {k: max((s.get(k) or 0) for s in self.samples) if self.samples else None
                         for k in ("pool_occupied", "pool_allocated", "pool_budget")},
            "pool_bounded": pool_ok,
            "alive_at_end": self.alive_at_end,
            "healthy_at_end": self.healthy_at_end,
            "violations": violations,
        }

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "summary": self.summary()}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": at(0.50), "p99": at(0.99), "max": values[-1], "count": len(values)}


def rss_growth(samples: list[dict], key: str = "rss_bytes") -> dict:
    """Least-squares slope of ``key`` (bytes) over ``samples``, as % of their mean per hour."""
    points = [(s["t_s"], s[key]) for s in samples if s.get(key)]
    if len(points) < 3:
        return {"samples": len(points), "growth_pct_per_hour": None}
    n = len(points)
    mean_t, mean_r = sum(t for t, _ in points) / n, sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0
    return {"samples": n, "first_bytes": points[0][1], "last_bytes": points[-1][1], "mean_bytes": mean_r,
            "max_bytes": max(r for _, r in points), "from_s": points[0][0], "to_s": points[-1][0],
            "growth_pct_per_hour": slope * 3600 / mean_r * 100}


def _anonymous_bytes(pid: int) -> int:
    """``RssAnon`` of ``pid``: resident memory not backed by a file (the heap; what a leak grows).
    RSS also counts file pages mapped as they are first touched (libraries, checkpoint mmaps)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory(pid: int) -> dict:
    """Resident and anonymous bytes of ``pid`` and all its descendants (the API server, engine
    core, workers), in total and per process (``"name:pid"``)."""
    import psutil

    memory = {"rss_bytes": 0, "anon_bytes": 0, "anon_by_process": {}}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return memory
    for proc in processes:
        try:
            memory["rss_bytes"] += proc.memory_info().rss
            anon = _anonymous_bytes(proc.pid)
            memory["anon_bytes"] += anon
            memory["anon_by_process"][f"{proc.name()}:{proc.pid}"] = anon
        except psutil.NoSuchProcess:
            pass
    return memory


def pool_bytes(base_url: str) -> dict:
    """``d2moe_pool_bytes`` by kind from ``/metrics`` (summed over engines)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    out = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "d2moe_pool_bytes":
                out[f"pool_{sample.labels.get('kind')}"] += sample.value
    return dict(out)


def classify(request: SoakRequest, outcome: dict, expected: dict, faulted: dict,
             started_s: float = 0.0) -> tuple[str, str | None]:
    """``(outcome class, name of the fault it is blamed on)`` of a request sent at ``started_s``;
    ``faulted``: ``{(layer, expert): (fault name, when it ended or None)}`` of the faults applied so
    far. A fault that had ended (injected read errors) before the request was sent explains nothing."""
    if "error" in outcome and (outcome["status"] is None or outcome["status"] >= 500 or outcome["status"] == 200):
        named = {(int(m[0]), int(m[1])) for m in EXPERT_NAMED.findall(outcome["error"])}
        blamed = [name for name, ended in (faulted[e] for e in named if e in faulted)
                  if ended is None or started_s <= ended]
        return ("failed_by_fault", blamed[0]) if blamed else ("unexplained", None)
    if not request.checked:
        return "abandoned", None
    if outcome == expected:
        return "ok", None
    return "wrong", None


async def soak(base_url: str, model: str, server_pid: int, requests: list[SoakRequest], expected: dict,
               faults: list[Fault], *, clients: int, duration_s: float, max_requests: int | None = None,
               request_timeout_s: float = 600, sample_every_s: float = 5.0, seed: int = 0,
               config: dict | None = None) -> SoakResult:
    """Drive ``clients`` concurrent clients for ``duration_s`` (or ``max_requests``) while applying
    ``faults`` on schedule; sample the server; check every answer against ``expected``."""
    import httpx
    import openai

    result = SoakResult(config={**(config or {}), "clients": clients, "duration_s": duration_s,
                                "request_kinds": sorted({r.kind for r in requests}),
                                "distinct_requests": len(requests)})
    faulted: dict[tuple[int, int], tuple[str, float | None]] = {}
    start = time.monotonic()
    deadline = start + duration_s
    sent = 0
    # No kept-alive connections: the server closes an idle one after 5 s, and a request sent on it
    # at that moment fails with "Connection error." before the server sees it (not a server fault).
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients + 8, max_keepalive_connections=0))
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                timeout=request_timeout_s, http_client=http)

    def now() -> float:
        return time.monotonic() - start

    async def worker(index: int):
        nonlocal sent
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline and (max_requests is None or sent < max_requests):
            sent += 1
            request = rng.choice(requests)
            begun = now()
            try:
                if request.kind == "cancel":
                    try:  # the client gives up while the server works on it
                        outcome = await asyncio.wait_for(send(client, model, request), timeout=rng.uniform(0.05, 1.0))
                    except asyncio.TimeoutError:
                        outcome = {"status": 200, "cancelled": True}
                else:
                    outcome = await asyncio.wait_for(send(client, model, request), timeout=request_timeout_s)
                kind, blamed = classify(request, outcome, expected.get(request.key), faulted, begun)
            except Exception as e:  # noqa: BLE001 (a timeout, a dropped connection: a lost answer)
                outcome, kind, blamed = {"exception": f"{type(e).__name__}: {e}"}, "lost", None
            record = {"kind": request.kind, "start_s": begun, "end_s": now(), "outcome": kind, "fault": blamed}
            if kind in ("wrong", "unexplained", "lost"):
                record.update(request=request.key, got=outcome, expected=expected.get(request.key))
            result.records.append(record)

    async def injector():
        events = sorted([(f.at, "apply", f) for f in faults] + [(f.until, "undo", f) for f in faults if f.undo])
        for at, action, fault in events:
            await asyncio.sleep(max(0.0, start + at * duration_s - time.monotonic()))
            if action == "apply":
                await asyncio.to_thread(fault.apply)
                fault.applied_s = now()
                faulted.update({e: (fault.name, None) for e in fault.experts})
            else:
                await asyncio.to_thread(fault.undo)
                faulted.update({e: (fault.name, now()) for e in fault.experts})
            result.faults.append({"name": fault.name, "action": action, "t_s": now(),
                                  "experts": [list(e) for e in fault.experts]})

    async def sampler():
        while time.monotonic() < deadline:
            sample = {"t_s": now(), **tree_memory(server_pid), "done": len(result.records)}
            try:
                sample.update(await asyncio.to_thread(pool_bytes, base_url))
            except OSError as e:
                sample["metrics_error"] = str(e)
            sample["healthy"] = await asyncio.to_thread(healthy, base_url)
            result.samples.append(sample)
            await asyncio.sleep(sample_every_s)

    side = [asyncio.create_task(injector()), asyncio.create_task(sampler())]
    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await client.close()
    result.config["wall_s"] = now()
    return result


def finish(result: SoakResult, proc, base_url: str) -> SoakResult:
    """Record whether the server process lives and ``/health`` answers, after the run."""
    result.alive_at_end = proc.poll() is None
    result.healthy_at_end = healthy(base_url)
    return result


def cached_expected_outcomes(pristine: Path, workdir: Path, quantization_config: dict, args: tuple[str, ...],
                             requests: list[SoakRequest], reference_cache: Path | None,
                             progress: Callable[[str], None], start_timeout_s: float = 1200) -> dict:
    """:func:`expected_outcomes` from an all-resident server of ``pristine`` (``quantization_config``
    without ``memory_budget`` and ``offload``), or from ``reference_cache`` (a JSON file) when it
    holds them for the same checkpoint, options and requests; written there when computed."""
    from vllm_d2moe.testing.served import running_server

    resident = {k: v for k, v in quantization_config.items() if k not in ("memory_budget", "offload")}
    # The worker's CPUs decide its thread count, which may change a float sum's order.
    cpus = {"usable": sorted(os.sched_getaffinity(0)), **reserved_cpus_to_share(),
            **{name: os.environ[name] for name in (RESERVED_CPUS_ENV, THREADS_BIND_ENV) if name in os.environ}}
    key = reference_cache_key(pristine, {"options": resident, "args": args, "cpus": cpus}, requests)
    cached = json.loads(reference_cache.read_text()) if reference_cache and reference_cache.exists() else {}
    if cached.get("key") == key:
        progress(f"expected outcomes of {len(cached['outcomes'])} requests from {reference_cache}")
        return cached["outcomes"]
    progress(f"expected outcomes: each of {sum(r.checked for r in requests)} requests alone, all resident")
    with running_server(str(pristine), resident, Path(workdir) / "reference-server.log", args,
                        start_timeout_s=start_timeout_s) as (_, reference):
        expected = expected_outcomes(reference, str(pristine), requests)
    if reference_cache:
        reference_cache.write_text(json.dumps({"key": key, "outcomes": expected}))
    return expected


def soak_run(pristine: Path, workdir: Path, *, quantization_config: dict, server_args: tuple[str, ...],
             clients: int, duration_s: float, max_model_len: int, section: int, targets: tuple[float, ...] = (),
             fault_kinds: tuple[str, ...] = FAULT_KINDS, fault_at: dict[str, float] | None = None,
             reference_cache: Path | None = None, max_requests: int | None = None,
             sample_every_s: float = 5.0, seed: int = 0, end_by_unix: float | None = None,
             start_timeout_s: float = 1200, progress: Callable[[str], None] | None = None) -> SoakResult:
    """The whole run: expected outcomes (:func:`cached_expected_outcomes`), then :func:`soak` against
    ``d2moe serve`` of a copy of ``pristine`` in ``workdir`` with ``quantization_config``, the faults
    applied to that copy; clients run ``duration_s``, or less when that would pass ``end_by_unix``
    (servers start slowly on a busy machine: the run's schedule scales with what is left)."""
    from vllm_d2moe.testing.served import start_server, stop, wait_healthy

    progress = progress or (lambda message: print(message, flush=True))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    requests = soak_requests(max_model_len, targets)
    args = (*server_args, "--max-model-len", str(max_model_len))
    served = workdir / "served-copy"
    if served.exists():
        shutil.rmtree(served)
    shutil.copytree(pristine, served)
    control = workdir / "injected-faults.json"
    write_injected_faults(control)
    faults = standard_faults(served, control, section, fault_at, fault_kinds)
    log = workdir / "server.log"
    progress(f"starting a server of a copy ({served}) with {json.dumps(quantization_config)}; log: {log}")
    proc, base = start_server(str(served), quantization_config, log, args, env={FAULTS_ENV: str(control)})
    try:
        # while the soak's server starts
        expected = cached_expected_outcomes(pristine, workdir, quantization_config, args, requests, reference_cache,
                                            progress, start_timeout_s)
        wait_healthy(proc, base, log, start_timeout_s)
        if end_by_unix is not None:
            duration_s = min(duration_s, end_by_unix - time.time())
        progress(f"{clients} clients for {duration_s:.0f} s; faults: " + "; ".join(f.name for f in faults))
        result = asyncio.run(soak(base, str(served), proc.pid, requests, expected, faults, clients=clients,
                                  duration_s=duration_s, max_requests=max_requests, sample_every_s=sample_every_s,
                                  seed=seed, config={"quantization_config": quantization_config,
                                                     "server_args": list(args), "targets": list(targets)}))
        finish(result, proc, base)
        # Counted before the stop: vLLM's own shutdown (abort mode) logs the engine's death with a traceback.
        result.config["server_log_tracebacks"] = log.read_text(errors="replace").count("Traceback")
    finally:
        stop(proc)
    return result

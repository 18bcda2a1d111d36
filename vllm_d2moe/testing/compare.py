"""Comparing greedy generations of two engine runs (``vllm_d2moe.testing.engine_runs`` results)
of one model that round differently: torch.compile and CUDA graphs against eager, bf16."""

# Such runs may pick another token where the reference run's top two log-probabilities are this
# close; a run computing something else (e.g. a CUDA graph replaying stale buffers) picks tokens
# far from the top.
NEAR_TIE_NATS = 0.15


def diverge_only_at_near_ties(reference: dict, other: dict, nats: float = NEAR_TIE_NATS) -> list[str]:
    """Where ``other``'s greedy tokens first differ from ``reference``'s (a run with ``logprobs``,
    at least the top few), the reasons that difference is not a near-tie; empty when each is one.
    Tokens after a prompt's first difference follow different prefixes and are not compared."""
    problems = []
    for i, (ref, oth) in enumerate(zip(reference["outputs"], other["outputs"], strict=True)):
        first = next((p for p, (a, b) in enumerate(zip(ref["token_ids"], oth["token_ids"])) if a != b), None)
        if first is None:
            if len(ref["token_ids"]) != len(oth["token_ids"]):
                problems.append(f"prompt {i}: {len(oth['token_ids'])} tokens against {len(ref['token_ids'])}")
            continue
        ranked = ref["logprobs"][first]
        chosen, top = str(oth["token_ids"][first]), max(ranked.values())
        if chosen not in ranked:
            problems.append(f"prompt {i}, position {first}: token {chosen} is not among the reference's "
                            f"{len(ranked)} most likely")
        elif top - ranked[chosen] > nats:
            problems.append(f"prompt {i}, position {first}: token {chosen} is {top - ranked[chosen]:.3f} nats "
                            f"below the reference's choice (near-tie: {nats})")
    return problems

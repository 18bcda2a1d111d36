"""vllm_d2moe.testing.compare: greedy runs that differ only at near-ties pass, others are named."""

from vllm_d2moe.testing.compare import NEAR_TIE_NATS, diverge_only_at_near_ties


def _run(tokens: list[list[int]], logprobs: list[list[dict]] | None = None) -> dict:
    outputs = [{"token_ids": t} for t in tokens]
    for out, lp in zip(outputs, logprobs or []):
        out["logprobs"] = lp
    return {"outputs": outputs}


REFERENCE = _run(
    [[5, 6, 7], [1, 2, 3]],
    [
        [{"5": -0.1, "9": -3.0}, {"6": -0.5, "8": -0.5 - NEAR_TIE_NATS / 2, "4": -2.0}, {"7": -0.2}],
        [{"1": -0.3}, {"2": -0.7, "3": -0.9}, {"3": -0.1}],
    ],
)


def test_identical_runs_pass():
    assert diverge_only_at_near_ties(REFERENCE, _run([[5, 6, 7], [1, 2, 3]])) == []


def test_a_near_tie_passes_and_later_tokens_are_not_compared():
    assert diverge_only_at_near_ties(REFERENCE, _run([[5, 8, 0], [1, 2, 3]])) == []


def test_a_clear_loser_or_an_unlisted_token_is_named():
    problems = diverge_only_at_near_ties(REFERENCE, _run([[5, 4, 7], [1, 2, 3]]))
    assert len(problems) == 1 and "prompt 0, position 1: token 4 is 1.500 nats below" in problems[0]
    problems = diverge_only_at_near_ties(REFERENCE, _run([[5, 6, 7], [1, 77, 3]]))
    assert len(problems) == 1 and "prompt 1, position 1: token 77 is not among" in problems[0]


def test_a_run_cut_short_is_named():
    problems = diverge_only_at_near_ties(REFERENCE, _run([[5, 6], [1, 2, 3]]))
    assert problems == ["prompt 0: 2 tokens against 3"]

"""The width decision of one MoE layer call on CPU as one C++ call (``cpu_width_select.cpp``).

As torch ops (what :class:`vllm_d2moe.width_selection.WidthSelector` runs
on GPU, and on CPU where this cannot be built) the decision is the router
product, a gather, bias and gain, log-softmax, the target shift, argmax or the
capacity assignment (:func:`vllm_d2moe.router.assign.assign_with_capacities`)
and a bincount for the statistics: 15 to 40 small ops per layer call whose
dispatch costs far more than their arithmetic. :func:`decision` does all of
it in one call and gives the same widths:

* logits: the dot products ``x_t . W[e, k]`` for the pair's own expert only
  (torch's product covers every expert), float32 with float accumulation
  in eight-lane partial sums. The sum order differs from torch's GEMM, so a
  logit may differ from torch's by float32 rounding, of order
  ``6e-8 * sqrt(hidden)`` times the size of the products; bias and gain are
  then added in torch's order and rounding, so when the products are exact
  (as in the tests) so is all that follows;
* log-softmax: torch's own CPU code (``ATen/native/cpu/LogSoftmaxKernelImpl.h``,
  Sleef ``exp``/``log``), compiled for AVX2 as torch runs it here, so the
  scores equal torch's bit for bit given the same logits (on an AVX-512 CPU
  torch runs the AVX-512 build of the same code: same per-lane functions,
  not verified here);
* shift, argmax (first maximum; NaN counts as the maximum) and the greedy
  capacity assignment (same ranks, same stable order, same
  ``ceil(c * N - 1e-9)`` limits) are exact.

A width choice can therefore differ from the torch path's only where two
scores of a pair, or two pairs' scores at a capacity cut, lie within those
few ulp: the tolerance of serving itself, whose hidden states differ from
any reference by more.

Its cost per layer call against the torch ops and the expert compute, for
three model shapes: ``benchmarks/results/router_cost.md``. A cold Python call
into C++ right after a layer call costs some microseconds before any work;
with more tokens the dot products dominate, bound by loading the router rows
(a pair reads its expert's ``K x hidden`` floats).

The extension compiles at first use into torch's extensions directory
(``~/.cache/torch_extensions``, about a minute); ``WidthSelector`` falls back
to the torch path, saying why once, when it cannot be built.
"""

import torch
import torch.utils.cpp_extension

from vllm_d2moe.kernels import require_avx2

_SOURCE = __file__.removesuffix(".py") + ".cpp"
# CPU_CAPABILITY selects ATen's AVX2 vector code (the log-softmax torch runs on
# an AVX2 CPU); -ffp-contract=off keeps ``a + g * w`` two roundings, as in torch.
_FLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-ffp-contract=off",
    "-DCPU_CAPABILITY=AVX2",
    "-DCPU_CAPABILITY_AVX2",
]
_module = None


def load():
    """Compile the extension (cached) and return it; raises with the reason where it cannot run."""
    global _module
    if _module is None:
        require_avx2()
        # A Python module, not a torch.ops op: the dispatcher's argument parsing would
        # cost more than the decision on a small model.
        _module = torch.utils.cpp_extension.load(
            name="d2moe_cpu_width_select", sources=[_SOURCE], extra_cflags=_FLAGS, is_python_module=True
        )
    return _module


def decision(router, widths, capacities, shift):
    """One layer's decision: ``decide(x, topk_weights, topk_ids)`` gives int8 widths
    ``[tokens, top_k]``, the number of pairs at each bit value 0..8 and the
    call's capacity excess (None without capacities), what
    :meth:`vllm_d2moe.width_selection.WidthStats.record_counts` takes.

    ``router`` is a CPU :class:`vllm_d2moe.router.model.WidthRouter` (held, not
    copied); ``widths`` its candidate widths, ``capacities`` one fraction per
    width or None (each pair's favourite), ``shift`` the target-bits shift (0:
    none). Made once per layer, so that a call converts only its three tensors.
    """
    return load().Decision(
        router.weight,
        router.bias,
        router.gain,
        router.kind == "expert",
        list(widths),
        None if capacities is None else list(capacities),
        float(shift),
    )

"""The package's layers import downward only: the format (``mwq``) under the kernels, both under
the router and the expert compute, all of them under serving (``vllm_glue``) and the tools on top;
the tests import the package, not ``benchmarks/``. Read from the sources, nothing is imported."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"vllm_d2moe": REPO / "vllm_d2moe", "vllm_d2moe.kernels": REPO / "kernels",
           "vllm_d2moe.converters": REPO / "converters"}

# What each lower layer may import of the package (its own modules included); the layers above
# (vllm_glue, eval, testing, replicas, the commands) may import any of these.
ALLOWED = {
    "vllm_d2moe.byte_sizes": (),
    "vllm_d2moe.token_windows": (),
    "vllm_d2moe.stop_signal": (),
    "vllm_d2moe.mwq": ("vllm_d2moe.mwq",),
    "vllm_d2moe.kernels": ("vllm_d2moe.kernels", "vllm_d2moe.mwq"),
    "vllm_d2moe.experts": ("vllm_d2moe.mwq", "vllm_d2moe.kernels"),
    "vllm_d2moe.reference": ("vllm_d2moe.reference", "vllm_d2moe.token_windows", "vllm_d2moe.stop_signal"),
    "vllm_d2moe.router": (
        "vllm_d2moe.router", "vllm_d2moe.mwq", "vllm_d2moe.token_windows", "vllm_d2moe.stop_signal",
        "vllm_d2moe.reference.corpus", "vllm_d2moe.reference.tokenizer",
    ),
    "vllm_d2moe.width_selection": ("vllm_d2moe.router", "vllm_d2moe.kernels"),
    "vllm_d2moe.offload": (
        "vllm_d2moe.offload", "vllm_d2moe.mwq", "vllm_d2moe.kernels", "vllm_d2moe.experts", "vllm_d2moe.byte_sizes",
    ),
    # Prediction sits beside offload, not above it: the serving glue will hand its forecasts to the pipeline.
    "vllm_d2moe.prefetch": (
        "vllm_d2moe.prefetch", "vllm_d2moe.mwq", "vllm_d2moe.router", "vllm_d2moe.converters.architectures",
        "vllm_d2moe.token_windows",
    ),
}
BENCHMARK_MODULES = {p.stem for p in (REPO / "benchmarks").glob("*.py")}


def module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def package_modules():
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            yield module_name(package, root, path), path


def test_lower_layers_import_only_what_is_below_them():
    upward = []
    for module, path in package_modules():
        layer = next((prefix for prefix in ALLOWED if within(module, prefix)), None)
        if layer is None:
            continue
        for name in imported(path):
            # "from vllm_d2moe.mwq import quantize" names vllm_d2moe.mwq too: a prefix of an allowed one.
            if within(name, "vllm_d2moe") and not any(
                within(name, ok) or within(ok, name) for ok in ALLOWED[layer]
            ):
                upward.append(f"{module} imports {name}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("*.py")), ids=lambda p: p.name)
def test_tests_do_not_import_benchmarks(path):
    assert not {name.split(".")[0] for name in imported(path)} & BENCHMARK_MODULES, (
        f"{path.name} imports a benchmarks/ module; what a test needs belongs in the package"
    )

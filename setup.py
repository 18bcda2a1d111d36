"""Install the vllm-d2moe plugin.

The top-level folders `kernels/` and `converters/` are installed as the
sub-packages `vllm_d2moe.kernels` and `vllm_d2moe.converters` so that no bare
`kernels` package collides with other installed distributions.
"""

from setuptools import setup

setup(
    packages=[
        "vllm_d2moe",
        "vllm_d2moe.mwq",
        "vllm_d2moe.vllm_glue",
        "vllm_d2moe.reference",
        "vllm_d2moe.eval",
        "vllm_d2moe.eval.zero_shot",
        "vllm_d2moe.testing",
        "vllm_d2moe.kernels",
        "vllm_d2moe.converters",
    ],
    package_dir={
        "vllm_d2moe": "vllm_d2moe",
        "vllm_d2moe.kernels": "kernels",
        "vllm_d2moe.converters": "converters",
    },
    # The embedded reference model (used by `d2moe demo`) and the CPU kernel's
    # C++ source, compiled at first use.
    package_data={
        "vllm_d2moe": ["assets/reference-small/*"],
        "vllm_d2moe.kernels": ["*.cpp"],
    },
)

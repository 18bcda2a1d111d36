"""Install the vllm-d2moe plugin.

The top-level folders `kernels/` and `converters/` are installed as the
sub-packages `vllm_d2moe.kernels` and `vllm_d2moe.converters` so that no bare
`kernels` package collides with other installed distributions. Every package
is found by the build (no hand-kept list): `scripts/wheel_check.py` fails CI
when a built wheel lacks any module of the source tree.
"""

from setuptools import find_packages, setup

# Installed name -> source folder, for the folders that live outside `vllm_d2moe/`.
RELOCATED = {"vllm_d2moe.kernels": "kernels", "vllm_d2moe.converters": "converters"}


def packages_in(folder: str, installed_as: str) -> list[str]:
    return [installed_as] + [f"{installed_as}.{name}" for name in find_packages(where=folder)]


packages = packages_in("vllm_d2moe", "vllm_d2moe")
for installed_as, folder in RELOCATED.items():
    packages += packages_in(folder, installed_as)

setup(
    packages=packages,
    # Sub-packages of a relocated folder resolve through its entry (longest prefix).
    package_dir={"vllm_d2moe": "vllm_d2moe", **RELOCATED},
    # The embedded reference model (used by `d2moe demo`) and the CPU kernels' C++
    # sources, compiled at first use.
    package_data={
        "vllm_d2moe": ["assets/reference-small/*"],
        "vllm_d2moe.kernels": ["*.cpp"],
    },
)

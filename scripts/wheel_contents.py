"""Fail when a built wheel lacks a module or data file of the source tree.

Usage: python scripts/wheel_contents.py REPO WHEEL

Every ``.py`` under ``vllm_d2moe/``, ``kernels/`` and ``converters/`` (the latter two
installed as ``vllm_d2moe.kernels`` / ``vllm_d2moe.converters``), every C++ kernel
source and every file of the embedded model must be in the wheel.
"""

import sys
import zipfile
from pathlib import Path

# Source folder -> its path inside the wheel (setup.py's package_dir).
INSTALLED_AT = {"vllm_d2moe": "vllm_d2moe", "kernels": "vllm_d2moe/kernels", "converters": "vllm_d2moe/converters"}
SHIPPED_SUFFIXES = {".py", ".cpp"}


def expected_files(repo: Path) -> set[str]:
    expected = set()
    for folder, installed in INSTALLED_AT.items():
        for path in (repo / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            relative = path.relative_to(repo / folder).as_posix()
            if path.suffix in SHIPPED_SUFFIXES or relative.startswith("assets/"):
                expected.add(f"{installed}/{relative}")
    return expected


def main(repo: str, wheel: str) -> int:
    expected = expected_files(Path(repo))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected - shipped)
    if missing:
        print(f"{wheel} lacks {len(missing)} file(s) of the source tree "
              f"(a package setup.py does not find?):", *missing, sep="\n  ", file=sys.stderr)
        return 1
    print(f"wheel holds all {len(expected)} modules and data files of the source tree")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

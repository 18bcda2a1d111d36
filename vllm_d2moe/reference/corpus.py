"""English technical-prose corpus for training and evaluating the reference model.

Sources are two Debian documentation packages, fetched with ``apt-get download``
(no system install, works offline from a Debian mirror):

* ``python3.11-doc``: reST sources of the Python documentation (PSF licence),
* ``linux-doc-6.1``: the kernel's ``Documentation/`` tree (GPL-2), leaving out
  ``devicetree/`` (YAML schemas), ``translations/`` (not English) and ``ABI/``
  (terse sysfs listings).

Each document is assigned to train/valid/test by a hash of its id (its path
relative to the source root), so the split never depends on file order or on
which other documents exist.

On disk (``<cache>/corpus``) each split is a JSON-lines file, one document per
line: ``{"id": "linux/admin-guide/README.rst", "text": "..."}``.  JSON lines keep
document boundaries exact without reserving a separator string.  A
``manifest.json`` records package versions and per-split statistics.  The cache
root is ``$D2MOE_CACHE`` or ``~/.cache/vllm_d2moe``.

Run ``python -m vllm_d2moe.reference.corpus`` to fetch the corpus and print its
statistics.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
# Percent of documents per split, by hash bucket (0-99): valid 0-4, test 5-9.
VALID_PERCENT = 5
TEST_PERCENT = 5

PACKAGES = ("python3.11-doc", "linux-doc-6.1")
PYTHON_SOURCES = "usr/share/doc/python3.11/html/_sources"
KERNEL_SOURCES = "usr/share/doc/linux-doc-6.1/Documentation"
KERNEL_EXCLUDED_DIRS = ("devicetree", "translations", "ABI")
# Shorter documents are index stubs and toctree-only pages.
MIN_DOCUMENT_CHARS = 200

# Bump when the on-disk format or the cleanup changes, so stale caches rebuild.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def cache_root() -> Path:
    return Path(os.environ.get("D2MOE_CACHE", "~/.cache/vllm_d2moe")).expanduser()


def default_corpus_dir() -> Path:
    return cache_root() / "corpus"


def split_of(doc_id: str) -> str:
    """Deterministic split assignment from a hash of the document id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 100
    if bucket < VALID_PERCENT:
        return "valid"
    if bucket < VALID_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


def clean_text(text: str) -> str:
    """Normalise line endings and whitespace; drop licence-tag lines."""
    lines = [
        line.rstrip()
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if "SPDX-License-Identifier" not in line
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def write_corpus(documents: list[Document], corpus_dir: Path, packages: dict[str, str]) -> dict:
    """Split ``documents`` and write the JSON-lines files plus ``manifest.json``.

    Writes into a sibling temp directory and renames it into place, so readers
    never see a half-written corpus.
    """
    corpus_dir = Path(corpus_dir)
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".corpus-", dir=corpus_dir.parent))
    stats = {name: {"documents": 0, "megabytes": 0.0} for name in SPLITS}
    files = {name: open(staging / f"{name}.jsonl", "w", encoding="utf-8") for name in SPLITS}
    try:
        for doc in sorted(documents, key=lambda d: d.id):
            name = split_of(doc.id)
            files[name].write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
            stats[name]["documents"] += 1
            stats[name]["megabytes"] += len(doc.text.encode()) / 1e6
    finally:
        for f in files.values():
            f.close()
    for entry in stats.values():
        entry["megabytes"] = round(entry["megabytes"], 2)
    manifest = {"format_version": FORMAT_VERSION, "packages": packages, "splits": stats}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if corpus_dir.exists():
        if any(corpus_dir.iterdir()) and not (corpus_dir / "manifest.json").exists():
            shutil.rmtree(staging)
            raise FileExistsError(f"{corpus_dir} exists and is not a corpus directory")
        shutil.rmtree(corpus_dir)  # a stale corpus (older format version)
    try:
        staging.rename(corpus_dir)
    except OSError:
        # Another process finished first; its corpus is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest(corpus_dir: Path | None = None) -> dict | None:
    path = Path(corpus_dir or default_corpus_dir()) / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("format_version") == FORMAT_VERSION else None


def ensure_corpus(corpus_dir: Path | None = None) -> Path:
    """Return the corpus directory, downloading and building it if missing."""
    corpus_dir = Path(corpus_dir or default_corpus_dir())
    if read_manifest(corpus_dir) is None:
        with tempfile.TemporaryDirectory(prefix="d2moe-corpus-") as tmp:
            documents, packages = _collect_from_debian(Path(tmp))
            write_corpus(documents, corpus_dir, packages)
    return corpus_dir


def load_documents(split: str, corpus_dir: Path | None = None) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(corpus_dir or default_corpus_dir()) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def load_split(split: str, corpus_dir: Path | None = None) -> list[str]:
    """Texts of one split, in id order."""
    return [doc.text for doc in load_documents(split, corpus_dir)]


def load_slice(split: str, max_chars: int, corpus_dir: Path | None = None) -> list[str]:
    """The split's first documents up to ``max_chars`` characters (last one cut)."""
    texts, remaining = [], max_chars
    for text in load_split(split, corpus_dir):
        if remaining <= 0:
            break
        texts.append(text[:remaining])
        remaining -= len(texts[-1])
    return texts


def _collect_from_debian(workdir: Path) -> tuple[list[Document], dict[str, str]]:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"`{tool}` not found: building the reference corpus needs a Debian/Ubuntu "
                f"system with apt (it runs `apt-get download {' '.join(PACKAGES)}`). "
                f"Alternatively copy a built corpus into {default_corpus_dir()} "
                "or point $D2MOE_CACHE at a directory holding one."
            )
    download = subprocess.run(
        ["apt-get", "download", *PACKAGES], cwd=workdir, capture_output=True, text=True
    )
    if download.returncode != 0:
        raise RuntimeError(
            f"`apt-get download {' '.join(PACKAGES)}` failed (run `apt-get update` first?):\n"
            + download.stderr
        )
    packages = {}
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        name, version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Version"],
            check=True, capture_output=True, text=True,
        ).stdout.split("\n")[:2]
        packages[name.split(": ", 1)[1]] = version.split(": ", 1)[1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    documents = [*_python_documents(root / PYTHON_SOURCES), *_kernel_documents(root / KERNEL_SOURCES)]
    return [d for d in documents if len(d.text) >= MIN_DOCUMENT_CHARS], packages


def _python_documents(sources: Path) -> list[Document]:
    # Sphinx copies each page's reST source to ``_sources/<page>.rst.txt``.
    return [
        Document(
            id="python/" + path.relative_to(sources).as_posix().removesuffix(".txt"),
            text=clean_text(path.read_text(encoding="utf-8", errors="replace")),
        )
        for path in sorted(sources.rglob("*.rst.txt"))
    ]


def _kernel_documents(sources: Path) -> list[Document]:
    # Debian gzips every file under Documentation/.
    documents = []
    for path in sorted(sources.rglob("*.gz")):
        rel = path.relative_to(sources).as_posix().removesuffix(".gz")
        if rel.split("/")[0] in KERNEL_EXCLUDED_DIRS or not rel.endswith((".rst", ".txt")):
            continue
        raw = gzip.decompress(path.read_bytes())
        documents.append(Document(id="linux/" + rel, text=clean_text(raw.decode("utf-8", errors="replace"))))
    return documents


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-dir", type=Path, default=None, help="default: $D2MOE_CACHE/corpus")
    args = parser.parse_args(argv)
    corpus_dir = ensure_corpus(args.corpus_dir)
    print(f"corpus: {corpus_dir}")
    print(json.dumps(read_manifest(corpus_dir), indent=2))


if __name__ == "__main__":
    main()

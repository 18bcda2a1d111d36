"""Damage a converted checkpoint's expert blobs in place (tests and fault injection run on a copy)."""

from pathlib import Path

from vllm_d2moe.mwq.checkpoint import MWQCheckpoint


def corrupt_section(model_dir: str | Path, layer: int, section: int, experts: list[int] | None = None) -> None:
    """Flip the first byte of section ``section`` (0: the base plane, ``k``: residual plane ``k``,
    read from width ``min_bits + k`` up) of every expert of ``layer`` in ``experts`` (default: all):
    reads of narrower widths stay intact, wider ones fail their checksum."""
    checkpoint = MWQCheckpoint(model_dir)
    entry = checkpoint.layer(layer)
    section_start = entry.layout.section_range(section)[0]
    for expert in range(entry.num_experts) if experts is None else experts:
        path, offset, _ = checkpoint.expert_extent(layer, expert)
        flip_byte(path, offset + section_start)


def flip_byte(path: str | Path, offset: int) -> None:
    """Invert the byte at ``offset`` of the file ``path``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))

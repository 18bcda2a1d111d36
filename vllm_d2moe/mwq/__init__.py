"""Matryoshka weight quantization (MWQ): quantizer, bit packing, and the
on-disk checkpoint format."""

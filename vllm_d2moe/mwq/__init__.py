"""Matryoshka weight quantization (MWQ): quantizer, bit packing, the
on-disk checkpoint format, and the stacked form a layer's experts are resident in."""

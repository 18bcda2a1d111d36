"""Reference model: a small Mixtral-style MoE LM trained on an English docs corpus.

Submodules (imported lazily so that importing this package stays cheap):

* ``corpus``: fetch, clean and split the corpus (``ensure_corpus``, ``load_split``),
* ``tokenizer``: byte-level BPE tokenizer training and corpus encoding,
* ``train``: presets, training loop, checkpoints and held-out evaluation.
"""

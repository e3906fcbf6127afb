"""The testbed: what lets the whole pipeline run on a laptop CPU, with nothing downloaded.

- `corpus`: the embedded corpus (Shakespeare, CPython's standard library, generated math),
  seeded disjoint train / validation / calibration / test splits under ``data/corpus``.
- `train`: trains the embedded default model on it (``python -m moepaper.testbed.train``).
- `embedded`: `load_embedded_model(name)`, the committed checkpoints ``data/models/embedded``
  (default, per-layer balance) and ``data/models/embedded-pooled``, ``-seed1`` and ``-16e`` (the ablations and the retrained default).
- `tasks`: its offline lm-eval suite (bits per byte and four-way multiple choice per domain).
- `tiny`: tiny random-initialised models of every supported family, for tests.

The testbed uses the core; the core never imports it.
"""

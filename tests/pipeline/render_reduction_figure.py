"""Render one figure from a torch reduction; print the sha256 of its PNG and PDF and of the reduction's value.

Run by test_determinism.py under different thread counts: ``python render_reduction_figure.py OUT_DIR [pinned]``.
"""

import hashlib
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

from moepaper.pipeline.figures import save_figure
from moepaper.pipeline.notebook import setup

out, pinned = Path(sys.argv[1]), sys.argv[2] == "pinned"
setup(seed=0, threads=1 if pinned else None)  # the notebooks' first call
x = torch.randn(64, 65536, generator=torch.Generator().manual_seed(0))  # (R, N) float32
sums = torch.stack([x[: r + 1].sum() for r in range(0, 64, 8)])  # whole-tensor sums: parallel reductions, split by thread
products = (x[:8, :4096] @ x[:8, :4096].T).diagonal()  # (8,): MKL sgemm
fig = Figure(figsize=(4, 3), layout="constrained")
ax = fig.subplots()
ax.plot(sums.numpy(), products.numpy(), "o")
ax.set_title(f"total {float(sums.sum()):.10g}")
paths = save_figure(fig, "reduction", out)
print("value", hashlib.sha256(sums.numpy().tobytes() + products.numpy().tobytes()).hexdigest())
for path in paths:
    print(path.suffix, hashlib.sha256(path.read_bytes()).hexdigest())

"""The GPU check: attention backends, bf16 parity and speed on CUDA, in one short run.

``python -m benchmarks.gpu --out DIR`` on any CUDA machine; ``--device cpu --smoke`` runs the
same code path on CPU in seconds (CI does, so the check never rots). ``python -m
benchmarks.gpu.wheels DIR`` builds the wheels it needs beyond torch, triton, transformers,
accelerate and pandas, for a GPU machine that cannot reach a package index.
"""

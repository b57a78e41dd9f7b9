"""The fused kernels, installed as ``grokfast_metrics.kernels`` (never as a top-level ``kernels``).

- ``connectivity``: the Triton kernel (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).
- ``connectivity_cpu`` (+ ``connectivity_cpu.cpp``): the fused C++ CPU kernel (AVX2/FMA), compiled on first use.

Both read the tail spec and the activation table of ``grokfast_metrics._tail``; which one runs is
decided in ``grokfast_metrics.core`` only.
"""

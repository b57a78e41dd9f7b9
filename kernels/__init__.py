"""The fused kernels, installed as ``grokfast_metrics.kernels`` (never as a top-level ``kernels``), named by strategy.

- ``triton``: which Triton kernel runs (the variant chosen once, ``GROKFAST_METRICS_TRITON_KERNEL``), above the two kernels:
  - ``triton_rowblock`` (v1): a program per row ``i`` and ``BLOCK_J`` columns, any supported depth;
  - ``triton_packed_mma`` (v2): pairs x ``T`` points packed into MMA rows, depth-1 tails without a final activation;
  - ``triton_common``: the jit helpers both share, and the ``LaunchConfig`` record.
- ``cpu_fused`` (+ ``cpu_fused.cpp``): the fused C++ CPU kernel (AVX2/FMA), compiled on first use.

Every launcher takes ``z = spec.absorb(h)`` (the first Linear applied by the caller). They read the tail spec and
the activation table of ``grokfast_metrics.foundation.tail``; which backend runs is decided in
``grokfast_metrics.compute.core`` only.
"""

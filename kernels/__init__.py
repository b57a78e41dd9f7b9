"""Triton kernels, installed as ``grokfast_metrics.kernels`` (never as a top-level ``kernels``)."""

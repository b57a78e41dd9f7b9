"""Figures of finished runs (``run``: ``grokfast-metrics plot RUN_DIR``)."""

"""The package version (``grokfast_metrics.__version__``, ``grokfast-metrics --version``)."""

__version__ = "0.1.0"

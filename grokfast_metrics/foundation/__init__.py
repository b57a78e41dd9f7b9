"""The foundation every layer reads: errors, the tail spec (``tail``), policy (``policy``), runtime (``runtime``), the
directory lock (``dirlock``). Imports nothing of the package. The layer order is in ``grokfast_metrics/_layers.py``."""

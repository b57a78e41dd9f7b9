"""LMN over training: the tracker (``tracker``), the torchmetrics integration (``metric``), the eigen step on host
threads (``async_eigen``), what is due at which step (``schedule``)."""

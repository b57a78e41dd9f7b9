"""LMN of a representation ``h`` through a tail: the public functions (``core``), the torch paths (``torch_paths``),
the generic path for any module (``generic``), the float64 references (``reference``, ``exact``)."""

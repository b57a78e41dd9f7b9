"""``python -m grokfast_metrics ...``: same as the ``grokfast-metrics`` console script."""
import sys

from .cli import main

sys.exit(main())

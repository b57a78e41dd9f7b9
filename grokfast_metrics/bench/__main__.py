"""``python -m grokfast_metrics.bench [options]``: same as ``grokfast-metrics bench``."""
import sys

from .command import main

sys.exit(main())

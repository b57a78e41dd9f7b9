"""``python -m grokfast_metrics.bench [options]``: same as ``grokfast-metrics bench``."""

import sys

from ..foundation.runtime import drop_checkout_from_path

drop_checkout_from_path()

from .command import main  # noqa: E402

sys.exit(main())

"""``python -m grokfast_metrics ...``: same as the ``grokfast-metrics`` console script."""
import sys

from ._runtime import drop_checkout_from_path

drop_checkout_from_path()

from .cli import main  # noqa: E402

sys.exit(main())

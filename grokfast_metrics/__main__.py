"""``python -m grokfast_metrics ...``: same as the ``grokfast-metrics`` console script."""

import sys

from .cli.main import main, starting  # the standard library only: Ctrl-C is handled from here on

with starting():  # importing torch: Ctrl-C is one line and exit 130
    from .foundation.runtime import drop_checkout_from_path

    drop_checkout_from_path()

sys.exit(main())

"""``python -m pool_builder`` is the ``pool-builder`` CLI."""

import sys

from .cli import main

sys.exit(main())

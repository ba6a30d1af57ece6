"""``python -m pool_builder`` is the ``pool-builder`` CLI."""

import sys

from pool_builder.cli import main

sys.exit(main())

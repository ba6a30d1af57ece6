"""``python -m converters`` is the ``poe-convert`` CLI."""

import sys

from .cli import main

sys.exit(main())

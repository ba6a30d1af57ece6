"""``python -m poe_service`` is the ``poe-service`` CLI."""

import sys

from poe_service.cli import main

sys.exit(main())

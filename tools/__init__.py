"""Developer tools that are not shipped in the wheel (see pyproject's package list)."""

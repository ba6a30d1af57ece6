"""The per-client limits of ``poe-service serve``, free of uvicorn and httptools so that checking the flags
needs neither (the protocol that enforces them is :mod:`poe_service.http_guard`)."""

from __future__ import annotations

from dataclasses import dataclass

from poe_service.errors import ServiceError


@dataclass(frozen=True)
class HttpLimits:
    """What one client may send and how long it may take; see ``poe-service serve --help``."""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    request_timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024 or self.max_headers < 8 or not self.request_timeout > 0:
            raise ServiceError(f"--max-header-bytes must be >= 1024, --max-headers >= 8 and --request-timeout > 0, "
                               f"got {self.max_header_bytes}, {self.max_headers}, {self.request_timeout}")

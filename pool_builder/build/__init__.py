"""Build orchestration: the build settings, the local build, experts, progressive stages, teachers, Ray.

The public API is re-exported here: ``build_pool(config_for("quick", out=...))``
(``pool_builder.build.ray_backend.build_pool_on_ray`` for ``--backend ray``).
"""

from pool_builder.build.config import PROFILES, BuildConfig, config_for
from pool_builder.build.local import build_pool

__all__ = ["PROFILES", "BuildConfig", "build_pool", "config_for"]

"""The model zoo: architectures by name, the WRN library/expert split, multi-teacher oracles, weight files.

Importing the package imports every module that registers an architecture kind
(see :mod:`pool_builder.models.registry`), so a pool.json record of any kind
can be rebuilt whichever submodule was imported first.
"""

from pool_builder.models import registry, wrn, weights, ensemble  # noqa: F401  (registration order matters)

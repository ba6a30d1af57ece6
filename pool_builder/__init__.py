"""Server side of Pool of Experts: build the pool (oracle -> library -> experts), compose and evaluate queries.

Sub-packages: ``data`` (data sets, task hierarchy), ``models`` (architectures,
weights, ensembles), ``distillation`` (losses, training loops, DDP), ``stages``
(resumable stage engine, caches), ``build`` (local and Ray builds), ``pool``
(pool.json, loading, composition, evaluation).  See docs/architecture.md.
Importing the package itself stays cheap and does not import torch.
"""

__version__ = "0.1.0"

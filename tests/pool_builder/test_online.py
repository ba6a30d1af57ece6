"""``--online`` re-runs oracle and library every batch; it must train the same experts as the cache."""

import numpy as np

from pool_builder.build import build_pool, config_for
from pool_builder.pool.loader import Pool

from ..conftest import FMNIST_DIR, TINY_BUILD

SHARED = ("oracle.pt", "library.pt", "stages/oracle.json", "stages/library.json")


def _derive(src, dst):
    """A pool directory that shares ``src``'s finished oracle and library stages."""
    (dst / "stages").mkdir(parents=True)
    for name in SHARED:
        (dst / name).write_bytes((src / name).read_bytes())


def test_online_matches_float32_cache(tmp_path, tiny_pool_dir, fmnist_small):
    settings = {**TINY_BUILD, "expert_epochs": 2, "cache_dtype": "float32"}
    pools = {}
    for mode in ("cached", "online"):
        out = tmp_path / mode
        _derive(tiny_pool_dir, out)
        logs = []
        build_pool(config_for("quick", out=str(out), data_dir=str(FMNIST_DIR), online=mode == "online", **settings),
                   log=logs.append, show_progress=False)
        assert "[library] done earlier, reusing library.pt" in logs
        assert (out / "cache").exists() == (mode == "cached")
        pools[mode] = Pool.open(out)
    a, b = pools["cached"], pools["online"]
    x = a.normalizer(fmnist_small.test.images[:64])
    feats = a.library()(x)
    for task in a.meta.experts:
        ya = a.expert(task)(feats).detach().numpy()
        yb = b.expert(task)(feats).detach().numpy()
        assert np.abs(ya - yb).max() < 0.05 * max(1.0, np.abs(ya).max()), task

"""``--online`` re-runs oracle and library every batch; it must train the same experts as the cache."""

import numpy as np
from pool_builder.build import build_pool, config_for
from pool_builder.pool import Pool

from ..conftest import FMNIST_DIR, TINY_BUILD


def test_online_matches_float32_cache(tmp_path, fmnist_small):
    settings = {**TINY_BUILD, "expert_epochs": 2, "cache_dtype": "float32"}
    cached = tmp_path / "cached"
    build_pool(config_for("quick", out=str(cached), data_dir=str(FMNIST_DIR), **settings), log=lambda m: None,
               show_progress=False)
    live = tmp_path / "online"
    # share oracle and library so that only the teacher-inference path differs
    live.mkdir()
    (live / "stages").mkdir()
    for name in ("oracle.pt", "library.pt", "stages/oracle.json", "stages/library.json"):
        (live / name).write_bytes((cached / name).read_bytes())
    logs = []
    build_pool(config_for("quick", out=str(live), data_dir=str(FMNIST_DIR), online=True, **settings),
               log=logs.append, show_progress=False)
    assert "[library] done earlier, reusing library.pt" in logs
    assert not (live / "cache").exists()
    a, b = Pool.open(cached), Pool.open(live)
    x = a.normalizer(fmnist_small.test.images[:64])
    feats = a.library()(x)
    for task in a.meta.experts:
        ya = a.expert(task)(feats).detach().numpy()
        yb = b.expert(task)(feats).detach().numpy()
        assert np.abs(ya - yb).max() < 0.05 * max(1.0, np.abs(ya).max()), task

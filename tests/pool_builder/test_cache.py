import numpy as np

from pool_builder.stages.cache import cached_array, open_cache, write_cache


def _chunks(values, step=3):
    return [(slice(i, i + step), values[i:i + step]) for i in range(0, len(values), step)]


def test_cache_round_trip_and_reuse(tmp_path):
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    path = tmp_path / "c.npy"
    calls = []

    def produce():
        calls.append(1)
        return _chunks(values)

    a = cached_array(path, "fp1", (10, 2), "float16", produce)
    b = cached_array(path, "fp1", (10, 2), "float16", produce)
    assert len(calls) == 1 and isinstance(b, np.memmap)
    np.testing.assert_array_equal(np.asarray(a), values.astype(np.float16))
    cached_array(path, "fp2", (10, 2), "float16", produce)  # another producer: recomputed
    assert len(calls) == 2


def test_corrupt_or_incomplete_cache_is_not_used(tmp_path):
    values = np.ones((4, 3), np.float32)
    path = tmp_path / "c.npy"
    write_cache(path, "fp", (4, 3), "float32", _chunks(values))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert open_cache(path, "fp") is None
    path.with_suffix(".json").unlink()
    assert open_cache(path, "fp") is None


def test_short_producer_leaves_nothing_behind(tmp_path):
    path = tmp_path / "c.npy"
    try:
        write_cache(path, "fp", (5, 1), "float32", _chunks(np.zeros((3, 1), np.float32)))
    except ValueError as exc:
        assert "gave 3 rows, expected 5" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("short producer accepted")
    assert list(tmp_path.iterdir()) == []
    record = tmp_path / "c.json"
    assert not record.exists()

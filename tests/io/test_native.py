"""cvg._C (csrc/pack_frames.cpp) against numpy: the same bytes, non-finite frames refused."""

import shutil

import numpy as np
import pytest

from cvg.io.native import MISSING, native
from cvg.io.video import to_uint8

pytestmark = pytest.mark.skipif(native is None and shutil.which("c++") is None, reason=f"no C++ compiler: {MISSING}")


def _numpy(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def test_the_extension_is_built_where_a_compiler_is():
    assert native is not None, MISSING


def test_pack_frames_gives_numpys_bytes():
    rng = np.random.default_rng(0)
    edges = np.concatenate([np.arange(256) / 255, (np.arange(256) + 0.5) / 255, [-1.0, -0.0, 1.0, 1.5, 3e38, -3e38]])
    near = np.nextafter(edges.astype(np.float32)[:, None], np.array([-np.inf, np.inf], np.float32)).ravel()
    values = np.concatenate([edges.astype(np.float32), near, rng.uniform(-0.2, 1.2, 100_000).astype(np.float32)])
    frames = np.resize(values, (len(values) // 48 + 1) * 48).reshape(-1, 4, 4, 3).astype(np.float32)
    packed = np.empty(frames.shape, np.uint8)
    assert native.pack_frames(frames, packed) == 0
    np.testing.assert_array_equal(packed, _numpy(frames))
    np.testing.assert_array_equal(to_uint8(frames), _numpy(frames))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_frames_are_refused(bad):
    frames = np.full((2, 4, 4, 3), 0.5, np.float32)
    frames[1, 2, 3, 0] = bad
    assert native.pack_frames(frames, np.empty(frames.shape, np.uint8)) == 1
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(frames)


def test_other_layouts_take_the_numpy_path():
    frames = np.random.default_rng(1).uniform(0, 1, (3, 5, 4, 3))
    np.testing.assert_array_equal(to_uint8(frames), _numpy(frames))  # float64
    np.testing.assert_array_equal(
        to_uint8(frames.astype(np.float32)[:, ::-1]), _numpy(frames.astype(np.float32)[:, ::-1])
    )
    with pytest.raises(ValueError, match="sizes differ"):
        native.pack_frames(np.zeros((2, 3), np.float32), np.zeros(5, np.uint8))

// cvg._C: native helpers on the hot path, bound with pybind11. Optional: without it cvg uses numpy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

// One block of `pack_frames`; the compiler vectorises it (see setup.py's flags). Returns the count of
// non-finite inputs. Branch-free on purpose: NaN fails `x > 0` and becomes 0, never an undefined cast.
unsigned pack_block(const float* __restrict in, std::uint8_t* __restrict out, std::size_t n) {
  unsigned not_finite = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const float x = in[i];
    not_finite += !(x - x == 0.0f);  // false for NaN and +-inf
    float clipped = x > 0.0f ? x : 0.0f;
    clipped = clipped < 1.0f ? clipped : 1.0f;
    out[i] = static_cast<std::uint8_t>(static_cast<int>(clipped * 255.0f + 0.5f));
  }
  return not_finite;
}

// Float frames in [0, 1] to bytes exactly as numpy's float32 (clip(x, 0, 1) * 255 + 0.5).astype(uint8),
// in one pass with the GIL released, where numpy makes three temporaries the size of the input.
// Returns how many inputs were not finite (their bytes are meaningless) so that the caller refuses them.
std::size_t pack_frames(py::array_t<float, py::array::c_style> src, py::array_t<std::uint8_t, py::array::c_style> dst) {
  if (src.size() != dst.size()) {
    throw std::invalid_argument("pack_frames: source and destination sizes differ");
  }
  const float* in = src.data();
  std::uint8_t* out = dst.mutable_data();
  const std::size_t n = static_cast<std::size_t>(src.size());
  constexpr std::size_t block = std::size_t{1} << 20;  // keeps each block's unsigned count from overflowing
  std::size_t not_finite = 0;
  py::gil_scoped_release release;
  for (std::size_t start = 0; start < n; start += block) {
    not_finite += pack_block(in + start, out + start, std::min(block, n - start));
  }
  return not_finite;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cvg's native helpers (optional; cvg falls back to numpy without them)";
  m.def("pack_frames", &pack_frames, py::arg("src"), py::arg("dst"),
        "float32 frames in [0, 1] -> uint8 into dst (same size, C order); returns the count of non-finite inputs");
}

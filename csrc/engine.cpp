// cvg::Engine over cvg's Python runtime, embedded with pybind11 (see include/cvg/cvg.hpp).
#include "cvg/cvg.hpp"

#include <pybind11/embed.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

namespace py = pybind11;

#ifndef CVG_PYTHON
#define CVG_PYTHON ""
#endif

namespace cvg {
namespace {

// Starts Python once per process and never finalises it: torch and numpy cannot be initialised again
// after Py_Finalize. A host that already runs Python (cvg loaded from a Python process) keeps its own.
void start_python(const std::string& python) {
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [&python] {
    if (Py_IsInitialized()) {
      return;
    }
    const char* from_env = std::getenv("CVG_PYTHON");
    const std::string executable = !python.empty() ? python : (from_env && *from_env ? from_env : CVG_PYTHON);
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;  // signals stay the host's
    config.parse_argv = 0;
    if (!executable.empty()) {
      // A virtual environment's python: Python finds its pyvenv.cfg and site-packages from here.
      PyConfig_SetBytesString(&config, &config.executable, executable.c_str());
    }
    try {
      py::initialize_interpreter(&config, 0, nullptr, false);
    } catch (const std::exception& e) {
      failure = std::string("cannot start Python (") + executable + "): " + e.what();
      return;
    }
    PyEval_SaveThread();  // no thread holds the GIL between calls; each call takes it
  });
  if (!failure.empty()) {
    throw Error(failure);
  }
}

// The one-line message of the Python exception in flight, as the cvg CLI prints it.
std::string message(const py::error_already_set& e) {
  std::string text = py::str(e.value());
  if (e.matches(PyExc_KeyError) && text.size() > 1 && text.front() == '\'') {
    text = text.substr(1, text.size() - 2);  // str(KeyError) quotes its message
  }
  const std::size_t newline = text.find('\n');
  return newline == std::string::npos ? text : text.substr(0, newline);
}

// Runs f with the GIL held; Python exceptions come out as cvg::Error.
template <class F>
auto with_python(F&& f) -> decltype(f()) {
  py::gil_scoped_acquire gil;
  try {
    return f();
  } catch (py::error_already_set& e) {
    throw Error(message(e));
  } catch (const py::cast_error& e) {
    throw Error(std::string("unexpected value from cvg's Python side: ") + e.what());
  }
}

}  // namespace

struct Engine::Impl {
  py::object engine;    // cvg.serving.service.Engine
  py::object generate;  // cvg.serving.cpp_api.generate
  int frames = 0, height = 0, width = 0;
  std::string backend;

  ~Impl() {
    py::gil_scoped_acquire gil;  // Python objects are released under the GIL
    engine = py::object();
    generate = py::object();
  }
};

Engine::Engine(const std::string& model_dir, const EngineOptions& options) {
  start_python(options.python);
  impl_ = with_python([&] {
    py::module_ embedding = py::module_::import("cvg.serving.cpp_api");
    py::dict opts;
    opts["height"] = options.height;
    opts["width"] = options.width;
    opts["frames"] = options.frames;
    opts["steps"] = options.steps;
    opts["guide_steps"] = options.guide_steps;
    opts["guidance_scale"] = options.guidance_scale;
    opts["backend"] = options.backend;
    opts["cache_dir"] = options.cache_dir;
    opts["classifier"] = options.classifier;
    opts["dtype"] = options.dtype;
    opts["vae_dtype"] = options.vae_dtype;
    auto impl = std::make_unique<Impl>();
    impl->engine = embedding.attr("open_engine")(model_dir, opts);
    impl->generate = embedding.attr("generate");
    auto shape = embedding.attr("video_shape")(impl->engine).cast<std::tuple<int, int, int>>();
    std::tie(impl->frames, impl->height, impl->width) = shape;
    impl->backend = py::str(impl->engine.attr("backend"));
    return impl;
  });
}

Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

int Engine::height() const { return impl_->height; }
int Engine::width() const { return impl_->width; }
int Engine::frames() const { return impl_->frames; }
std::string Engine::backend() const { return impl_->backend; }

std::size_t Engine::frame_bytes() const {
  return static_cast<std::size_t>(impl_->frames) * impl_->height * impl_->width * 3;
}

std::vector<float> Engine::generate_into(const std::string& prompt, const std::string& composition,
                                         std::uint64_t seed, std::uint8_t* pixels, std::size_t size) const {
  if (pixels == nullptr || size != frame_bytes()) {
    throw Error("generate_into needs a buffer of frame_bytes() = " + std::to_string(frame_bytes()) + " bytes, got " +
                std::to_string(size));
  }
  return with_python([&] {
    // The Python engine serialises requests; it waits for its lock and runs torch with the GIL released.
    py::tuple result = impl_->generate(impl_->engine, prompt, composition, seed);
    auto frames = result[0].cast<py::array_t<std::uint8_t, py::array::c_style>>();
    if (static_cast<std::size_t>(frames.size()) != size) {
      throw Error("cvg returned " + std::to_string(frames.size()) + " bytes of frames, expected " +
                  std::to_string(size));
    }
    const std::uint8_t* source = frames.data();
    {
      py::gil_scoped_release released;  // `frames` keeps the array alive meanwhile
      std::memcpy(pixels, source, size);
    }
    return result[1].cast<std::vector<float>>();
  });
}

Video Engine::generate(const std::string& prompt, const std::string& composition, std::uint64_t seed) const {
  Video video;
  video.frames = impl_->frames;
  video.height = impl_->height;
  video.width = impl_->width;
  video.pixels.resize(frame_bytes());
  video.objective_values = generate_into(prompt, composition, seed, video.pixels.data(), video.pixels.size());
  return video;
}

}  // namespace cvg

// cvg: compositional video guidance, embedded in C++.
//
//   cvg::Engine engine("models/compshapes-wan");            // loads, builds, warms up (seconds)
//   cvg::Video video = engine.generate("a red cube to the left of a blue ball",
//                                      "red cube left of blue ball", /*seed=*/0);
//   // video.pixels: video.frames x video.height x video.width x 3 RGB bytes, row-major
//
// The engine runs cvg's Python runtime (torch, diffusers) inside this process through pybind11's
// embedding API: the interpreter starts with the first Engine and lives until the process exits.
// Every call may come from any thread. Calls on one Engine run one at a time (the model's buffers are
// shared); no call holds Python's global lock while it waits, so other engines and Python threads go on.
// Every failure is a cvg::Error whose what() is the one-line message cvg's Python API gives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// libcvg hides everything else (pybind11 and Python among it); these names are its interface.
#if defined(_WIN32)
#define CVG_API
#else
#define CVG_API __attribute__((visibility("default")))
#endif

namespace cvg {

// A failure inside cvg: bad model directory, bad composition, bad options, a runtime error.
class CVG_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct EngineOptions {
  // Video shape the engine is built for; 0 takes the size a cvg-trained model records, else Wan's 480x832x81.
  int height = 0;
  int width = 0;
  int frames = 0;
  int steps = 20;               // denoising steps
  int guide_steps = 4;          // guided (gradient) steps at the start (cvg.GuidanceConfig's default)
  float guidance_scale = 5.0f;  // classifier-free guidance
  std::string backend = "auto";  // step engine for the later steps: auto, onnxruntime, compiled, tensorrt, torch,
                                 // or "" for diffusers eager
  std::string cache_dir;         // step-engine cache ("" = cvg's default)
  std::string classifier;        // a `cvg train-classifier` directory to guide with ("" = training-free objectives)
  std::string dtype = "float32";      // the transformer's precision: float32, bfloat16 or float16
  std::string vae_dtype = "float32";  // the VAE decode's precision, chosen apart (same choices)
  // The Python whose packages (cvg, torch, diffusers) the engine uses: a virtual environment's
  // bin/python. "" = the CVG_PYTHON environment variable, else the Python cvg was built against.
  std::string python;
};

// One generated video. pixels holds frames * height * width * 3 bytes (RGB, uint8, row-major: frame,
// row, column, channel).
struct Video {
  int frames = 0;
  int height = 0;
  int width = 0;
  std::vector<std::uint8_t> pixels;
  // Objective value before each guided update (lower = the composition holds better); empty when
  // the request had no composition. With a classifier these are -log p(label): the classifier's score
  // of the composition is exp(-value).
  std::vector<float> objective_values;
};

class CVG_API Engine {
 public:
  // Loads the diffusers Wan directory `model_dir` and builds the engine for the options' shape.
  explicit Engine(const std::string& model_dir, const EngineOptions& options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  // Generates one video. `composition` uses cvg's text form ("red cube left of blue ball",
  // "ball moves right", ...) or JSON; "" generates without guidance.
  Video generate(const std::string& prompt, const std::string& composition, std::uint64_t seed) const;

  // The same into a caller-owned buffer of exactly frame_bytes() bytes; returns the objective values.
  std::vector<float> generate_into(const std::string& prompt, const std::string& composition, std::uint64_t seed,
                                   std::uint8_t* pixels, std::size_t size) const;

  int height() const;
  int width() const;
  int frames() const;
  std::size_t frame_bytes() const;  // frames * height * width * 3
  std::string backend() const;      // the step engine in use, as cvg names it

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cvg

// cvg::Engine from C++: requests from 4 threads at once equal the sequential ones; bad input gives a
// cvg::Error with the one-line message, and the engine works after it.
//
//   test_engine MODEL_DIR STEPS     exit 0 when every check holds; each failure is printed
#include <cvg/cvg.hpp>

#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;
const auto start = std::chrono::steady_clock::now();

void check(bool ok, const std::string& what) {
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  std::cout << (ok ? "ok   " : "FAIL ") << "[" << elapsed.count() << " s] " << what << std::endl;
  failures += !ok;
}

// The cvg::Error message of f(), or "" when f() does not throw one.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const cvg::Error& e) {
    return e.what();
  }
  return "";
}

bool one_line_naming(const std::string& message, const std::string& needle) {
  return !message.empty() && message.find('\n') == std::string::npos && message.find(needle) != std::string::npos;
}

struct Request {
  std::string prompt, composition;
  std::uint64_t seed;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: test_engine MODEL_DIR STEPS\n";
    return 2;
  }
  const std::string model = argv[1];
  cvg::EngineOptions options;
  options.steps = std::stoi(argv[2]);
  options.backend = "";

  const std::string missing = error_of([&] { cvg::Engine("/nonexistent/cvg-model", options); });
  check(one_line_naming(missing, "/nonexistent/cvg-model"), "a bad model path is a one-line cvg::Error: " + missing);

  const cvg::Engine engine(model, options);
  check(engine.frame_bytes() == static_cast<std::size_t>(engine.frames()) * engine.height() * engine.width() * 3,
        "frame_bytes is frames x height x width x 3");

  const std::vector<Request> requests = {
      {"a red cube to the left of a blue ball", "red cube left of blue ball", 0},
      {"a blue ball to the left of a red cube", "blue ball left of red cube", 1},
      {"a green triangle moves right", "triangle moves right", 2},
      {"a red cube", "", 3},
  };
  std::vector<cvg::Video> sequential;
  for (const auto& r : requests) sequential.push_back(engine.generate(r.prompt, r.composition, r.seed));
  // At least one update per guided step (up to GuidanceConfig.iterations each), none without a composition.
  check(sequential[0].objective_values.size() >= static_cast<size_t>(options.guide_steps) &&
            sequential[3].objective_values.empty(),
        "objective values per guided step, none without a composition");
  check(sequential[0].pixels != sequential[1].pixels, "different requests give different videos");

  std::vector<cvg::Video> parallel(requests.size());
  std::vector<std::string> thread_errors(requests.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] {
      thread_errors[i] = error_of([&] {
        parallel[i] = engine.generate(requests[i].prompt, requests[i].composition, requests[i].seed);
      });
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < requests.size(); ++i) {
    check(thread_errors[i].empty(), "thread " + std::to_string(i) + " succeeded " + thread_errors[i]);
    check(parallel[i].pixels == sequential[i].pixels && parallel[i].objective_values == sequential[i].objective_values,
          "thread " + std::to_string(i) + " equals its sequential result");
  }

  const std::string absent = error_of([&] { engine.generate("a red cube", "purple cone left of red cube", 0); });
  check(one_line_naming(absent, "purple"), "a composition word absent from the prompt is a one-line cvg::Error: " + absent);
  std::vector<std::uint8_t> small(10);
  const std::string buffer = error_of([&] { engine.generate_into("a red cube", "", 0, small.data(), small.size()); });
  check(one_line_naming(buffer, "frame_bytes"), "a wrong-size buffer is a cvg::Error: " + buffer);
  const cvg::Video after = engine.generate(requests[0].prompt, requests[0].composition, requests[0].seed);
  check(after.pixels == sequential[0].pixels, "after the errors the engine still gives the same video");

  cvg::EngineOptions half = options;
  half.dtype = "float64";
  const std::string bad_dtype = error_of([&] { cvg::Engine(model, half); });
  check(one_line_naming(bad_dtype, "float64"), "an unknown dtype is a one-line cvg::Error: " + bad_dtype);
  half.dtype = "bfloat16";
  half.vae_dtype = "float64";
  const std::string bad_vae_dtype = error_of([&] { cvg::Engine(model, half); });
  check(one_line_naming(bad_vae_dtype, "vae_dtype"), "an unknown vae_dtype is a one-line cvg::Error: " + bad_vae_dtype);
  half.vae_dtype = "bfloat16";
  const cvg::Engine bf16(model, half);
  const cvg::Video video = bf16.generate(requests[0].prompt, requests[0].composition, requests[0].seed);
  check(video.pixels.size() == bf16.frame_bytes() && video.objective_values.size() == sequential[0].objective_values.size(),
        "a bfloat16 engine gives a whole video and one objective value per update");

  std::cout << (failures ? "FAILED " + std::to_string(failures) : std::string("all checks hold")) << std::endl;
  return failures ? 1 : 0;
}

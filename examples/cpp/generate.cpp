// Writes the frames of one generated video as PPM images (frame_0000.ppm, ...), then one JSON line.
//
//   generate MODEL_DIR PROMPT OUT_DIR [--composition TEXT] [--seed N] [--steps N] [--backend NAME]
//            [--classifier DIR]
//
// Exit status 0 on success, 1 on a cvg::Error (its one-line message on stderr), 2 on bad arguments.
#include <cvg/cvg.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

namespace {

int usage() {
  std::cerr << "usage: generate MODEL_DIR PROMPT OUT_DIR [--composition TEXT] [--seed N] [--steps N] "
               "[--backend NAME] [--classifier DIR]\n";
  return 2;
}

// Frame i of `video` as a binary PPM, written to a temporary name and renamed: no half-written frames.
void write_ppm(const cvg::Video& video, int i, const std::filesystem::path& path) {
  const std::size_t bytes = static_cast<std::size_t>(video.height) * video.width * 3;
  const std::filesystem::path partial = path.string() + ".partial";
  {
    std::ofstream out(partial, std::ios::binary);
    out << "P6\n" << video.width << " " << video.height << "\n255\n";
    out.write(reinterpret_cast<const char*>(video.pixels.data() + i * bytes), static_cast<std::streamsize>(bytes));
    if (!out) throw std::runtime_error("cannot write " + partial.string());
  }
  std::filesystem::rename(partial, path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) return usage();
  const std::string model = argv[1], prompt = argv[2];
  const std::filesystem::path out_dir = argv[3];
  std::string composition;
  std::uint64_t seed = 0;
  cvg::EngineOptions options;
  options.backend = "";  // diffusers eager: no engine build for a one-off run
  for (int i = 4; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return usage();
    const std::string value = argv[i + 1];
    if (flag == "--composition") composition = value;
    else if (flag == "--seed") seed = std::stoull(value);
    else if (flag == "--steps") options.steps = std::stoi(value);
    else if (flag == "--backend") options.backend = value;
    else if (flag == "--classifier") options.classifier = value;
    else return usage();
  }
  try {
    const cvg::Engine engine(model, options);
    const cvg::Video video = engine.generate(prompt, composition, seed);
    std::filesystem::create_directories(out_dir);
    for (int i = 0; i < video.frames; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "frame_%04d.ppm", i);
      write_ppm(video, i, out_dir / name);
    }
    std::cout << "{\"frames\": " << video.frames << ", \"height\": " << video.height << ", \"width\": " << video.width
              << ", \"backend\": \"" << engine.backend() << "\", \"objective\": [";
    for (std::size_t i = 0; i < video.objective_values.size(); ++i) {
      std::cout << (i ? ", " : "") << video.objective_values[i];
    }
    std::cout << "]}" << std::endl;
  } catch (const cvg::Error& e) {
    std::cerr << "cvg: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

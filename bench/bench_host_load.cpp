// Host-load benchmark: refit's load_to_host against the page-cache read ceiling, on the same files.
//
//   bench_host_load COMPONENT_DIR [--threads N] [--repeat R] [--json]
//
// COMPONENT_DIR is one Diffusers component folder (one *.safetensors, or shards plus
// *.safetensors.index.json). Each repetition runs (a) the ceiling: pread of every weight file into one
// reusable, pre-touched buffer, chunked like the loader, on the same threads; then (b) refit:
// open_module_dir + load_to_host with default options. Absolute times on shared machines are noise,
// so compare the two (bench/host_load.py adds Python's safetensors on the same files and cache state).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/parallel.hpp"

namespace fs = std::filesystem;
namespace rw = refit::weights;

namespace {

struct options {
  fs::path dir;
  unsigned threads = 0;
  unsigned repeat = 5;
  bool json = false;
};

[[noreturn]] void usage_error(const std::string& why) {
  std::cerr << "bench_host_load: " << why << "\n"
            << "usage: bench_host_load COMPONENT_DIR [--threads N] [--repeat R] [--json]\n";
  std::exit(2);
}

unsigned parse_count(const char* flag, const char* text, unsigned min) {
  unsigned v = 0;
  const char* end = text + std::strlen(text);
  auto [p, ec] = std::from_chars(text, end, v);
  if (ec != std::errc() || p != end || v < min)
    usage_error(std::string(flag) + " needs an integer >= " + std::to_string(min) + ", got '" + text + "'");
  return v;
}

options parse_args(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--threads") o.threads = parse_count("--threads", value(), 0);
    else if (a == "--repeat") o.repeat = parse_count("--repeat", value(), 1);
    else if (a == "--json") o.json = true;
    else if (a.starts_with("--") || !o.dir.empty()) usage_error("unexpected argument '" + a + "'");
    else o.dir = a;
  }
  if (o.dir.empty()) usage_error("missing COMPONENT_DIR");
  if (o.threads == 0) o.threads = rw::default_threads();
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct file_chunk {
  int fd;
  uint64_t offset, len;
};

// The ceiling: what the kernel can copy out of the page cache into memory that is already faulted in.
class page_cache_reader {
 public:
  page_cache_reader(const std::vector<fs::path>& files, uint64_t chunk_bytes) {
    uint64_t largest = 0;
    for (const auto& path : files) {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) throw std::runtime_error(path.string() + ": cannot open: " + std::strerror(errno));
      fds_.push_back(fd);
      const uint64_t size = fs::file_size(path);
      for (uint64_t at = 0; at < size; at += chunk_bytes) chunks_.push_back({fd, at, std::min(chunk_bytes, size - at)});
      bytes_ += size;
      largest = std::max(largest, size);
    }
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, std::max<uint64_t>(largest, 1)) != 0) throw std::runtime_error("cannot allocate the read buffer");
    buffer_.reset(static_cast<std::byte*>(p));
    std::memset(buffer_.get(), 0, largest);  // fault it in once, so reads measure copying only
  }
  ~page_cache_reader() {
    for (int fd : fds_) ::close(fd);
  }

  uint64_t bytes() const { return bytes_; }

  // Chunks of different files may land on the same buffer bytes; the contents are never looked at.
  void read_all(unsigned threads) const {
    rw::parallel_for_each(chunks_.size(), threads, [&](size_t i) {
      const file_chunk& c = chunks_[i];
      for (uint64_t done = 0; done < c.len;) {
        const ssize_t r = ::pread(c.fd, buffer_.get() + c.offset + done, c.len - done, static_cast<off_t>(c.offset + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) throw std::runtime_error(std::string("page-cache read failed: ") + (r < 0 ? std::strerror(errno) : "file shrank"));
        done += static_cast<uint64_t>(r);
      }
    });
  }

 private:
  struct free_deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::vector<int> fds_;
  std::vector<file_chunk> chunks_;
  std::unique_ptr<std::byte, free_deleter> buffer_;
  uint64_t bytes_ = 0;
};

nlohmann::json summarize(std::vector<double> runs, uint64_t bytes) {
  std::vector<double> sorted = runs;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  const double median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  return {{"runs_s", runs},
          {"best_s", sorted.front()},
          {"median_s", median},
          {"best_gbps", bytes / sorted.front() / 1e9},
          {"median_gbps", bytes / median / 1e9}};
}

}  // namespace

int main(int argc, char** argv) {
  const options opt = parse_args(argc, argv);
  try {
    const rw::module_weights reference = rw::open_module_dir("bench", opt.dir);
    std::vector<fs::path> files;
    for (const auto& shard : reference.shards) files.push_back(shard.path());
    rw::host_load_options load_options;  // the defaults, but the benchmark's thread count
    load_options.threads = opt.threads;
    const page_cache_reader ceiling(files, load_options.chunk_bytes);

    // Destinations for the reuse mode, allocated and faulted in once, as a refitting server keeps them.
    rw::named_tensors reused = rw::load_to_host(reference, load_options);
    rw::host_load_options mapped_options = load_options;
    mapped_options.storage = rw::host_load_options::backing::mapped;

    std::vector<double> ceiling_runs, copy_runs, reuse_runs, mapped_runs, mapped_touch_runs;
    bool sane = true;
    std::string mismatch;
    auto check = [&](const rw::named_tensors& tensors, const char* mode) {
      uint64_t loaded_bytes = 0;
      for (const auto& [name, t] : tensors) loaded_bytes += t.nbytes();
      if (tensors.size() != reference.tensors.size() || loaded_bytes != reference.total_bytes) {
        sane = false;
        mismatch = std::string(mode) + " loaded " + std::to_string(tensors.size()) + " tensors / " +
                   std::to_string(loaded_bytes) + " bytes, module has " + std::to_string(reference.tensors.size()) +
                   " / " + std::to_string(reference.total_bytes);
      }
    };
    for (unsigned r = 0; r < opt.repeat; ++r) {
      auto start = std::chrono::steady_clock::now();
      ceiling.read_all(opt.threads);
      ceiling_runs.push_back(seconds_since(start));

      // Opening is timed too: Python's load_file also opens the files and parses the headers.
      start = std::chrono::steady_clock::now();
      {
        const rw::module_weights weights = rw::open_module_dir("bench", opt.dir);
        auto tensors = rw::load_to_host(weights, load_options);
        copy_runs.push_back(seconds_since(start));
        check(tensors, "copy");
      }  // freed before the next mode, outside the timed region

      start = std::chrono::steady_clock::now();
      {
        const rw::module_weights weights = rw::open_module_dir("bench", opt.dir);
        rw::read_into(weights, reused, load_options);
        reuse_runs.push_back(seconds_since(start));
      }

      start = std::chrono::steady_clock::now();
      {
        const rw::module_weights weights = rw::open_module_dir("bench", opt.dir);
        auto tensors = rw::load_to_host(weights, mapped_options);
        mapped_runs.push_back(seconds_since(start));
        // Touching one byte per page makes the mapping real, as the Python peer's touch pass does.
        uint64_t sum = 0;
        for (const auto& [name, t] : tensors) {
          const auto* p = static_cast<const volatile uint8_t*>(t.data_ptr());
          for (uint64_t off = 0; off < t.nbytes(); off += 4096) sum += p[off];
        }
        mapped_touch_runs.push_back(seconds_since(start));
        check(tensors, "mapped");
        if (sum == 1) std::fprintf(stderr, " ");  // keeps the touch loop from being optimised away
      }
    }

    const nlohmann::json report = {
        {"dir", opt.dir.string()},        {"files", files.size()},
        {"tensors", reference.tensors.size()}, {"tensor_bytes", reference.total_bytes},
        {"file_bytes", ceiling.bytes()},  {"threads", opt.threads},
        {"chunk_bytes", load_options.chunk_bytes}, {"repeat", opt.repeat},
        {"ceiling", summarize(ceiling_runs, ceiling.bytes())},
        {"refit_copy", summarize(copy_runs, reference.total_bytes)},
        {"refit_reuse", summarize(reuse_runs, reference.total_bytes)},
        {"refit_mapped", summarize(mapped_runs, reference.total_bytes)},
        {"refit_mapped_touch", summarize(mapped_touch_runs, reference.total_bytes)},
        {"sane", sane}};
    if (opt.json) {
      std::cout << report.dump() << "\n";
    } else {
      std::printf("%s: %zu files, %zu tensors, %.3f GB, %u threads, %u repetitions\n", opt.dir.c_str(), files.size(),
                  reference.tensors.size(), reference.total_bytes / 1e9, opt.threads, opt.repeat);
      for (const char* what : {"ceiling", "refit_copy", "refit_reuse", "refit_mapped", "refit_mapped_touch"}) {
        const auto& s = report[what];
        std::printf("  %-18s best %.3f s (%.2f GB/s)  median %.3f s (%.2f GB/s)\n", what, s["best_s"].get<double>(),
                    s["best_gbps"].get<double>(), s["median_s"].get<double>(), s["median_gbps"].get<double>());
      }
      std::printf("  refit_reuse/ceiling (median): %.2f\n",
                  report["refit_reuse"]["median_gbps"].get<double>() / report["ceiling"]["median_gbps"].get<double>());
    }
    if (!sane) {
      std::cerr << "bench_host_load: " << opt.dir.string() << ": " << mismatch << "\n";
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "bench_host_load: " << opt.dir.string() << ": " << e.what() << "\n";
    return 1;
  }
}

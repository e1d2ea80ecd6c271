// How fast can gigabytes of host memory be page-locked, and is the result as fast to copy from?
// refit pins its offload host stores and in-place undo snapshots (GBs) with one exact-size allocation
// per dtype; this compares ways of getting such memory:
//   host_alloc          cudaHostAlloc (what refit used first)
//   register            mmap, every page touched by N threads, then cudaHostRegister
//   register_huge       the same with madvise(MADV_HUGEPAGE) before the touch
// For each: seconds to get the memory, GB/s of block-sized host-to-device copies from it (against
// host_alloc's in the same run: the ceiling), and seconds to give it back. Prints JSON.
//
//   bench_pin [--gb 8] [--threads 16] [--block-mb 300] [--repeat 2]
#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstring>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct pinned {
  char* p = nullptr;
  size_t bytes = 0;
  bool registered = false;  // mmap + cudaHostRegister, else cudaHostAlloc
};

void touch(char* p, size_t bytes, unsigned threads) {
  std::vector<std::thread> ts;
  const size_t chunk = (bytes / threads + 4095) / 4096 * 4096;
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([=] {
      const size_t b = std::min(bytes, t * chunk), e = std::min(bytes, b + chunk);
      if (e > b) std::memset(p + b, 0, e - b);
    });
  for (auto& t : ts) t.join();
}

pinned get(const std::string& method, size_t bytes, unsigned threads) {
  pinned m;
  m.bytes = bytes;
  if (method == "host_alloc") {
    check(cudaHostAlloc(reinterpret_cast<void**>(&m.p), bytes, cudaHostAllocDefault), "cudaHostAlloc");
    return m;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
  m.p = static_cast<char*>(p);
  if (method == "register_huge") madvise(p, bytes, MADV_HUGEPAGE);
  touch(m.p, bytes, threads);
  check(cudaHostRegister(p, bytes, cudaHostRegisterDefault), "cudaHostRegister");
  m.registered = true;
  return m;
}

void put(pinned& m) {
  if (m.registered) {
    check(cudaHostUnregister(m.p), "cudaHostUnregister");
    munmap(m.p, m.bytes);
  } else {
    check(cudaFreeHost(m.p), "cudaFreeHost");
  }
}

// Block-sized copies host -> device over the whole buffer, as the offload does per transformer call.
double copy_rate(const pinned& m, void* dev, size_t block, cudaStream_t s) {
  const size_t blocks = m.bytes / block;
  for (size_t i = 0; i < std::min<size_t>(blocks, 2); ++i) check(cudaMemcpyAsync(dev, m.p + i * block, block, cudaMemcpyHostToDevice, s), "copy");
  check(cudaStreamSynchronize(s), "sync");
  const auto t0 = clock_type::now();
  for (size_t i = 0; i < blocks; ++i)
    check(cudaMemcpyAsync(static_cast<char*>(dev) + (i % 2) * block, m.p + i * block, block, cudaMemcpyHostToDevice, s), "copy");
  check(cudaStreamSynchronize(s), "sync");
  return static_cast<double>(blocks * block) / since(t0) / 1e9;
}

}  // namespace

int main(int argc, char** argv) try {
  double gb = 8;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  size_t block_mb = 300;
  int repeat = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--gb") gb = std::stod(value());
    else if (a == "--threads") threads = static_cast<unsigned>(std::stoul(value()));
    else if (a == "--block-mb") block_mb = std::stoul(value());
    else if (a == "--repeat") repeat = std::stoi(value());
    else if (a == "--help" || a == "-h") {
      std::cout << "usage: bench_pin [--gb 8] [--threads N] [--block-mb 300] [--repeat 2]\n";
      return 0;
    } else throw std::invalid_argument("unknown argument " + a);
  }
  const size_t bytes = static_cast<size_t>(gb * 1e9) / 4096 * 4096;
  const size_t block = block_mb << 20;
  check(cudaSetDevice(0), "cudaSetDevice");
  void* dev = nullptr;
  check(cudaMalloc(&dev, 2 * block), "cudaMalloc");
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  nlohmann::json out{{"gb", bytes / 1e9}, {"threads", threads}, {"block_mb", block_mb}, {"runs", nlohmann::json::array()}};
  std::map<std::string, double> best_get, best_rate;
  for (int r = 0; r < repeat; ++r)
    for (const std::string method : {"host_alloc", "register", "register_huge"}) {
      auto t0 = clock_type::now();
      pinned m = get(method, bytes, threads);
      const double get_s = since(t0);
      const double rate = copy_rate(m, dev, block, s);
      t0 = clock_type::now();
      put(m);
      const double put_s = since(t0);
      out["runs"].push_back({{"method", method}, {"get_s", get_s}, {"get_gb_per_s", bytes / get_s / 1e9}, {"h2d_gb_per_s", rate}, {"free_s", put_s}});
      if (!best_get.count(method) || get_s < best_get[method]) best_get[method] = get_s;
      best_rate[method] = std::max(best_rate[method], rate);
    }
  for (const auto& [method, s] : best_get)
    out["summary"][method] = {{"get_s", s},
                              {"get_speedup_vs_host_alloc", best_get["host_alloc"] / s},
                              {"h2d_vs_host_alloc", best_rate[method] / best_rate["host_alloc"]}};
  std::cout << out.dump(2) << "\n";
  cudaFree(dev);
  return 0;
} catch (const std::exception& e) {
  std::cerr << "bench_pin: " << e.what() << "\n";
  return 1;
}

// GPU load benchmark: refit's device loader against the ceilings, on the same files, in one run.
//   bench_device_load COMPONENT_DIR [--device N] [--threads 16] [--repeat 3] [--cold 0|1]   (--cold 0: skip the
//   cold reads, which drop the page cache and need root)
// Prints JSON: page cache -> pinned read rate (the staging ring's reads alone), pinned host-to-device copy
// rate, and refit's device_loader::read_into into preallocated device tensors (warm page cache), in GB/s.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "pipeline/weights/device_loader.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/parallel.hpp"

namespace rw = refit::weights;
using clock_type = std::chrono::steady_clock;

static double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: bench_device_load COMPONENT_DIR [--device N] [--threads N] [--repeat N] [--cold 0|1]\n";
    return 2;
  }
  int device = 0;
  unsigned threads = 16, repeat = 3;
  bool cold = true;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--device") device = std::stoi(argv[i + 1]);
    else if (k == "--threads") threads = static_cast<unsigned>(std::stoul(argv[i + 1]));
    else if (k == "--repeat") repeat = static_cast<unsigned>(std::stoul(argv[i + 1]));
    else if (k == "--cold") cold = std::string(argv[i + 1]) != "0";
    else {
      std::cerr << "bench_device_load: unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const auto weights = rw::open_module_dir("bench", argv[1]);
    const uint64_t bytes = weights.total_bytes;

    // Ceiling 1: page cache -> pinned memory, chunked reads on `threads` threads. The chunk size matters (issue 19):
    // small chunks stay in the last-level cache between the page-cache read and the pinned write; 64 MiB chunks
    // do not. Both are measured, and the chunk of the loader's own ring geometry.
    const auto ring = rw::choose_staging_geometry();
    const uint64_t chunk = 64ull << 20;
    void* pinned = nullptr;
    cudaHostAlloc(&pinned, chunk * threads, cudaHostAllocDefault);
    struct piece { int fd; uint64_t off, len; };
    auto read_rate_runs = [&](uint64_t piece_bytes) {
      std::vector<piece> pieces;
      for (const auto& s : weights.shards)
        for (uint64_t off = 0; off < s.file_size(); off += piece_bytes) pieces.push_back({s.fd(), off, std::min(piece_bytes, s.file_size() - off)});
      std::vector<double> runs;
      for (unsigned r = 0; r < repeat; ++r) {
        auto t = clock_type::now();
        std::atomic<size_t> next{0};
        rw::parallel_for_each(threads, threads, [&](size_t slot) {
          for (size_t i = next++; i < pieces.size(); i = next++) {
            auto* dst = static_cast<char*>(pinned) + slot * piece_bytes;
            for (uint64_t done = 0; done < pieces[i].len;) {
              ssize_t n = ::pread(pieces[i].fd, dst + done, pieces[i].len - done, static_cast<off_t>(pieces[i].off + done));
              if (n <= 0) throw std::runtime_error("read failed");
              done += static_cast<uint64_t>(n);
            }
          }
        });
        runs.push_back(since(t));
      }
      return runs;
    };
    std::vector<double> read_runs = read_rate_runs(chunk), small_read_runs = read_rate_runs(ring.slot_bytes), h2d_runs, refit_runs,
                        refit_big_ring_runs, dram_runs;
    // DRAM: a `threads`-way memcpy of 2 GiB between two host buffers (each byte read once and written once).
    {
      const size_t n = 2ull << 30;
      std::vector<char> a(n, 1), b(n, 0);
      for (unsigned r = 0; r < repeat; ++r) {
        auto t = clock_type::now();
        rw::parallel_for_each(threads, threads, [&](size_t i) {
          const size_t per = n / threads, begin = i * per, len = i + 1 == threads ? n - begin : per;
          std::memcpy(b.data() + begin, a.data() + begin, len);
        });
        dram_runs.push_back(since(t));
      }
    }
    // Ceiling 2: pinned host -> device copies of 64 MiB chunks totalling the module's bytes.
    at::Tensor dev = at::empty({static_cast<int64_t>(chunk)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    for (unsigned r = 0; r < repeat; ++r) {
      cudaDeviceSynchronize();
      auto t = clock_type::now();
      for (uint64_t done = 0; done < bytes; done += chunk)
        cudaMemcpyAsync(dev.data_ptr(), static_cast<char*>(pinned) + (done / chunk % threads) * chunk, std::min(chunk, bytes - done),
                        cudaMemcpyHostToDevice, nullptr);
      cudaDeviceSynchronize();
      h2d_runs.push_back(since(t));
    }
    cudaFreeHost(pinned);
    // refit: device_loader into preallocated device tensors of the stored dtype.
    // With the ring the server uses (from the LLC), and with the 32 x 32 MiB ring refit had before.
    rw::device_loader loader(device, ring.slot_bytes, ring.slots, threads, ring.copy_streams);
    rw::named_tensors dst;
    for (const auto& [name, loc] : weights.tensors)
      dst.emplace_back(name, at::empty(loc.entry->shape, at::TensorOptions().dtype(rw::to_scalar_type(loc.entry->type)).device(at::kCUDA, device)));
    {
      rw::device_loader big(device, 32ull << 20, 2 * threads, threads);
      for (unsigned r = 0; r < repeat + 1; ++r) {
        auto a = loader.read_into(weights, dst, {});
        auto b = big.read_into(weights, dst, {});
        if (r > 0) {  // the first also faults in the files' pages
          refit_runs.push_back(a.seconds);
          refit_big_ring_runs.push_back(b.seconds);
        }
      }
    }
    // Cold: the disk's O_DIRECT read rate (16 threads, 64 MiB aligned chunks), then refit's loader on a
    // dropped page cache (it switches to O_DIRECT for files that are not resident). Needs root.
    std::vector<double> direct_runs, cold_runs;
    uint64_t cold_direct_bytes = 0;
    auto drop = [] {
      ::sync();
      FILE* f = std::fopen("/proc/sys/vm/drop_caches", "w");
      if (!f) return false;
      const bool ok = std::fputs("3\n", f) >= 0;
      return std::fclose(f) == 0 && ok;
    };
    if (cold && drop()) {
      void* aligned = nullptr;
      cudaHostAlloc(&aligned, chunk * threads, cudaHostAllocDefault);
      std::vector<int> dfds;
      std::vector<piece> dpieces;
      for (const auto& s : weights.shards) {
        dfds.push_back(::open(s.path().c_str(), O_RDONLY | O_DIRECT));
        for (uint64_t off = 0; off < s.file_size(); off += chunk) dpieces.push_back({dfds.back(), off, std::min(chunk, s.file_size() - off)});
      }
      auto t = clock_type::now();
      std::atomic<size_t> next{0};
      rw::parallel_for_each(threads, threads, [&](size_t slot) {
        for (size_t i = next++; i < dpieces.size(); i = next++) {
          auto* dst = static_cast<char*>(aligned) + slot * chunk;
          const uint64_t want = (dpieces[i].len + 4095) / 4096 * 4096;
          for (uint64_t done = 0; done < dpieces[i].len;) {
            ssize_t n = ::pread(dpieces[i].fd, dst + done, want - done, static_cast<off_t>(dpieces[i].off + done));
            if (n <= 0) throw std::runtime_error("O_DIRECT read failed");
            done += static_cast<uint64_t>(n);
          }
        }
      });
      direct_runs.push_back(since(t));
      for (int fd : dfds) ::close(fd);
      cudaFreeHost(aligned);
      drop();
      const auto cold_weights = rw::open_module_dir("bench", argv[1]);
      auto stats = loader.read_into(cold_weights, dst, {});
      cold_runs.push_back(stats.seconds);
      cold_direct_bytes = stats.direct_bytes;
    }
    auto best = [&](std::vector<double> v) { return bytes / *std::min_element(v.begin(), v.end()) / 1e9; };
    auto median = [&](std::vector<double> v) { std::sort(v.begin(), v.end()); return bytes / v[v.size() / 2] / 1e9; };
    nlohmann::json out = {{"dir", argv[1]}, {"bytes", bytes}, {"threads", threads},
                          {"page_cache_to_pinned_gbps", {{"best", best(read_runs)}, {"median", median(read_runs)}}},
                          {"pinned_h2d_gbps", {{"best", best(h2d_runs)}, {"median", median(h2d_runs)}}},
                          {"refit_device_loader_gbps", {{"best", best(refit_runs)}, {"median", median(refit_runs)}}},
                          {"page_cache_to_pinned_ring_chunk_gbps", {{"best", best(small_read_runs)}, {"median", median(small_read_runs)}}},
                          {"refit_device_loader_32x32mib_ring_gbps", {{"best", best(refit_big_ring_runs)}, {"median", median(refit_big_ring_runs)}}},
                          {"dram_memcpy_gbps", {{"best", (2ull << 30) / *std::min_element(dram_runs.begin(), dram_runs.end()) / 1e9}}},
                          {"llc_mib", ring.llc_bytes >> 20},
                          {"ring", {{"slot_mib", ring.slot_bytes >> 20}, {"slots", ring.slots}, {"copy_streams", ring.copy_streams}, {"source", ring.source}}}};
    out["refit_over_h2d_ceiling"] = out["refit_device_loader_gbps"]["median"].get<double>() / out["pinned_h2d_gbps"]["median"].get<double>();
    if (!direct_runs.empty()) {
      out["cold_o_direct_read_gbps"] = best(direct_runs);
      out["refit_cold_gbps"] = best(cold_runs);
      out["refit_cold_direct_bytes"] = cold_direct_bytes;
      out["refit_cold_over_o_direct"] = best(cold_runs) / best(direct_runs);
    } else {
      out["cold"] = "not measured: cannot drop the page cache here";
    }
    std::cout << out.dump(1) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "bench_device_load: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

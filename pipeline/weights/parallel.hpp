// A bounded fork-join over independent tasks, for I/O and hashing work on plain threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace refit::weights {

inline unsigned default_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// Runs fn(i) for i in [0, n) on up to `threads` threads, in ascending order of i per claim.
// The first exception thrown stops further claims and is rethrown here.
template <class Fn>
void parallel_for_each(size_t n, unsigned threads, Fn&& fn) {
  if (threads == 0) threads = default_threads();
  threads = static_cast<unsigned>(std::min<size_t>(threads, n));
  std::atomic<size_t> next{0};
  std::exception_ptr first_error;
  std::mutex error_mutex;
  auto work = [&] {
    for (;;) {
      size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!first_error) first_error = std::current_exception();
        next.store(n);
        return;
      }
    }
  };
  if (threads <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace refit::weights

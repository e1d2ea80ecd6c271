// The HTTP server's handler threads (net/http_server.cpp): they grow on demand up to a limit and never shrink.
// Private to net/.
#pragma once

#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

namespace refit::net::http {

// ---------------------------------------------------------------------------------------------
// Handler threads: grow on demand up to a limit, never shrink (they are few and cheap idle).

class handler_pool : public std::enable_shared_from_this<handler_pool> {
 public:
  explicit handler_pool(unsigned max_threads) : max_(std::max(1u, max_threads)) {}

  void post(std::function<void()> task) {
    std::unique_lock lock(mu_);
    tasks_.push_back(std::move(task));
    cv_.notify_one();
    // A woken thread counts as idle until it takes its task: grow while tasks outnumber idle threads, so a
    // request never waits behind a long one while the pool may still grow.
    if (tasks_.size() > idle_ && threads_ < max_) {
      ++threads_;
      try {
        std::thread([self = shared_from_this()] { self->run(); }).detach();
      } catch (const std::system_error& e) {
        --threads_;  // the machine's thread limit: the task waits for a running thread
        spdlog::warn("http: cannot start another handler thread ({} running): {}", threads_, e.what());
      }
    }
  }

  // Threads exit once the queue is empty; waits at most `wait` for them. Returns how many still run.
  size_t stop(std::chrono::milliseconds wait) {
    std::unique_lock lock(mu_);
    stopping_ = true;
    cv_.notify_all();
    exited_.wait_for(lock, wait, [this] { return threads_ == 0; });
    return threads_;
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      --idle_;
      if (tasks_.empty()) break;  // stopping
      auto task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
    --threads_;
    exited_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_, exited_;
  std::deque<std::function<void()>> tasks_;
  unsigned max_, threads_ = 0, idle_ = 0;
  bool stopping_ = false;
};

}  // namespace refit::net::http

// gloo/common/error.h: the exception types gloo throws inside libtorch (their typeinfo is exported by
// libtorch_cpu.so, so a catch of gloo::IoException here matches them).
#pragma once
#include <chrono>
#include <stdexcept>
#include <string>

namespace gloo {
const std::chrono::milliseconds kNoTimeout = std::chrono::milliseconds::zero();

struct Exception : public std::runtime_error {
  explicit Exception(const std::string& msg) : std::runtime_error(msg) {}
};
struct InvalidOperationException : public Exception {
  explicit InvalidOperationException(const std::string& msg) : Exception(msg) {}
};
struct IoException : public Exception {
  explicit IoException(const std::string& msg) : Exception(msg) {}
};
struct EnforceNotMet : public Exception {
  explicit EnforceNotMet(const std::string& msg) : Exception(msg) {}
};
}  // namespace gloo

#define GLOO_THROW_INVALID_OPERATION_EXCEPTION(...) throw ::gloo::InvalidOperationException("gloo: invalid operation")

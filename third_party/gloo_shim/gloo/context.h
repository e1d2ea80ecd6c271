// gloo/context.h: gloo::Context as built into torch 2.11 (not polymorphic). Only members that
// libtorch_cpu.so exports are declared; the data members mirror gloo's so that layouts agree. Nothing in
// refit creates or destroys a Context.
#pragma once
#include <chrono>
#include <cstddef>
#include <memory>

namespace gloo {
namespace transport {
class Context;
class Device;
class Pair;
class UnboundBuffer;
}  // namespace transport

class Context {
 public:
  Context(int rank, int size, int base = 2);
  ~Context();

  const int rank;
  const int size;
  int base;

  std::shared_ptr<transport::Device>& getDevice();
  std::unique_ptr<transport::Pair>& getPair(int i);
  std::unique_ptr<transport::UnboundBuffer> createUnboundBuffer(void* ptr, size_t size);
  int nextSlot(int numToSkip = 1);
  void closeConnections();
  void setTimeout(std::chrono::milliseconds timeout);
  std::chrono::milliseconds getTimeout() const;

 protected:
  std::shared_ptr<transport::Device> device_;
  std::shared_ptr<transport::Context> transportContext_;
  int slot_;
  std::chrono::milliseconds timeout_;
};
}  // namespace gloo

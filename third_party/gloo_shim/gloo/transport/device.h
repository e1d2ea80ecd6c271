// gloo/transport/device.h: ProcessGroupGloo.hpp only holds devices through shared_ptr.
#pragma once
#include <memory>
namespace gloo::transport {
class Device;
class UnboundBuffer;
}  // namespace gloo::transport

// gloo/rendezvous/store.h with gloo's IStore ("v2" methods), as in torch 2.11, so that the GlooStore
// adapter ProcessGroupGloo.hpp defines inline has the same virtual layout as libtorch's.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <gloo/common/error.h>

#define GLOO_STORE_HAS_STORE_V2 1

namespace gloo {
class IStore {
 public:
  virtual ~IStore() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual std::vector<char> wait_get(const std::string& key, const std::chrono::milliseconds& timeout) {
    wait({key}, timeout);
    return get(key);
  }
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
  virtual bool has_v2_support() = 0;
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>& keys) = 0;
  virtual void multi_set(const std::vector<std::string>& keys, const std::vector<std::vector<char>>& values) = 0;
  virtual void append(const std::string& key, const std::vector<char>& value) = 0;
  virtual int64_t add(const std::string& key, int64_t value) = 0;
};

namespace rendezvous {
class Store : public IStore {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::seconds(30);
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) { wait(keys); }
  virtual bool has_v2_support() { return false; }
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>&) { GLOO_THROW_INVALID_OPERATION_EXCEPTION(); }
  virtual void multi_set(const std::vector<std::string>&, const std::vector<std::vector<char>>&) {
    GLOO_THROW_INVALID_OPERATION_EXCEPTION();
  }
  virtual void append(const std::string&, const std::vector<char>&) { GLOO_THROW_INVALID_OPERATION_EXCEPTION(); }
  virtual int64_t add(const std::string&, int64_t) { GLOO_THROW_INVALID_OPERATION_EXCEPTION(); }
};
}  // namespace rendezvous
}  // namespace gloo

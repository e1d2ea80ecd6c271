// libFuzzer target: the restricted pickle reader (net/pickle_reader.cpp) over arbitrary bytes taken as a
// whole payload. Any exception other than bad_pickle, any sanitizer report (a leak is a cycle of values),
// a hang, or a value breaking what the reader promises (checked below) is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <unordered_map>

#include "net/pickle_reader.hpp"

namespace {

namespace pk = refit::net::pickle;

// Visits each distinct value below the root once (memo sharing makes a DAG whose tree may be exponential;
// the distinct values are bounded by the input) and checks: no cycles, every nested value sealed, a depth
// above every child's and at most 64, only admitted globals, and values and edges linear in the input.
struct checker {
  explicit checker(size_t input_size) : size(input_size) {}
  size_t size;
  std::unordered_map<const pk::value*, bool> seen;  // false while on the path: met again, a cycle
  size_t edges = 0;

  void child(const pk::value& parent, const pk::ref& c) {
    if (!c || !c->sealed || c->depth + 1 > parent.depth) __builtin_trap();
    // Each opcode pushes at most one value; each pushed value lands in at most one container, and a call
    // or BUILD copies a tuple's items or a dict's entries at most once.
    if (++edges > 2 * size) __builtin_trap();
    walk(*c);
  }
  void walk(const pk::value& v) {
    auto [it, fresh] = seen.try_emplace(&v, false);
    bool& done = it->second;  // references into an unordered_map survive rehashing
    if (!fresh) {
      if (!done) __builtin_trap();  // a cycle
      return;
    }
    if (seen.size() > size || v.depth > 64) __builtin_trap();
    if (pk::describe(v).empty()) __builtin_trap();
    using kind = pk::value::kind;
    if ((v.k == kind::global || v.k == kind::call || v.k == kind::object) && !pk::allowed_global(v.s)) __builtin_trap();
    for (const auto& x : v.items) child(v, x);
    for (const auto& [k, x] : v.entries) {
      child(v, k);
      child(v, x);
    }
    done = true;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const pk::ref root = pk::read(std::string_view(reinterpret_cast<const char*>(data), size));
    if (!root) __builtin_trap();
    checker(size).walk(*root);
  } catch (const pk::bad_pickle&) {
  }
  return 0;
}

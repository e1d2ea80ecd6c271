// A restricted reader of Python pickles (protocols 3-5), for the tensor handles a colocated trainer sends
// (SGLang's update_weights_from_tensor: torch's multiprocessing reductions, base64 in JSON).
//
// It never runs anything: it turns the opcodes into a tree of plain values, where a call (REDUCE, NEWOBJ)
// is a node naming its callable and holding its arguments. Only globals on a fixed list of torch's rebuild
// functions, classes and dtypes (and SGLang's bucket metadata) may appear; any other global, opcode or
// construct (persistent ids, extensions, ...) is refused naming it. Sizes are bounded by the input and by
// fixed limits (depth, memo entries, container sizes), so hostile bytes cost at most linear time and memory.
// Fuzzed: tests/fuzz/fuzz_pickle.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace refit::net::pickle {

struct bad_pickle : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct value;
using ref = std::shared_ptr<value>;

struct value {
  enum class kind { none, boolean, integer, floating, string, bytes, list, tuple, dict, global, call, object };
  kind k = kind::none;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;                            // string, bytes, global ("module.name"); call/object: the callable's name
  std::vector<ref> items;                   // list, tuple; call: the arguments; object: NEWOBJ's arguments
  std::vector<std::pair<ref, ref>> entries; // dict; object (and a SimpleNamespace call): the state BUILD gave it
  uint32_t depth = 0;                       // of the nesting below it
  bool sealed = false;                      // inside another value: no longer changed (so no cycles)
};

// Whether "module.name" is a global the reader admits.
bool allowed_global(std::string_view qualified);

// The value the pickle stops with. Throws bad_pickle naming the offset and what is wrong, e.g.
// "Blocked unsafe global (os.system) during pickle deserialization".
ref read(std::string_view bytes);

// For messages: "list", "tuple", "call of torch.Size", ...
std::string describe(const value& v);

}  // namespace refit::net::pickle

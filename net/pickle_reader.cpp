#include "net/pickle_reader.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <map>

namespace refit::net::pickle {

namespace {

constexpr size_t max_depth = 64;              // nested containers / calls
constexpr size_t max_memo = 1u << 20;         // memo entries
constexpr size_t max_stack = 1u << 20;        // values on the stack

// The globals a trainer's payload may name: torch's rebuild functions and the classes and dtypes they take,
// SGLang's CUDA rebuild and bucket metadata, and the plain-object helpers pickle uses for them.
constexpr std::array allowed{
    "torch.multiprocessing.reductions.rebuild_tensor",
    "torch.multiprocessing.reductions.rebuild_typed_storage",
    "torch.multiprocessing.reductions.rebuild_storage_filename",
    "torch.multiprocessing.reductions.rebuild_cuda_tensor",
    "torch.multiprocessing.reductions.rebuild_parameter",
    "sglang.srt.utils.patch_torch._rebuild_cuda_tensor_modified",
    "sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata",
    "types.SimpleNamespace",
    "copyreg.__newobj__",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
    "torch.Size",
    "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16",
    "torch.float8_e4m3fn", "torch.float8_e5m2",
    "torch.int64", "torch.int32", "torch.int16", "torch.int8", "torch.uint8", "torch.bool",
};

struct reader {
  std::string_view in;
  size_t pos = 0;
  std::vector<ref> stack;
  std::vector<size_t> marks;
  std::map<uint64_t, ref> memo;

  [[noreturn]] void fail(const std::string& why) const {
    throw bad_pickle("pickle byte " + std::to_string(pos) + ": " + why);
  }
  void need(size_t n) const {
    if (in.size() - pos < n) fail("truncated (needs " + std::to_string(n) + " more bytes)");
  }
  uint64_t le(size_t n) {
    need(n);
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= static_cast<uint64_t>(static_cast<uint8_t>(in[pos + k])) << (8 * k);
    pos += n;
    return v;
  }
  std::string take(uint64_t n) {
    if (n > in.size() - pos) fail("a length of " + std::to_string(n) + " runs past the end");
    std::string s(in.substr(pos, n));
    pos += n;
    return s;
  }
  std::string line() {
    const size_t end = in.find('\n', pos);
    if (end == std::string_view::npos) fail("unterminated text argument");
    std::string s(in.substr(pos, end - pos));
    pos = end + 1;
    return s;
  }

  static ref make(value::kind k) {
    auto v = std::make_shared<value>();
    v->k = k;
    return v;
  }
  void push(ref v) {
    if (stack.size() >= max_stack) fail("too many values");
    stack.push_back(std::move(v));
  }
  ref pop() {
    if (stack.size() <= (marks.empty() ? 0 : marks.back())) fail("stack underflow");
    ref v = std::move(stack.back());
    stack.pop_back();
    return v;
  }
  ref& top() {
    if (stack.size() <= (marks.empty() ? 0 : marks.back())) fail("stack underflow");
    return stack.back();
  }
  std::vector<ref> pop_mark() {
    if (marks.empty()) fail("no MARK to pop to");
    const size_t m = marks.back();
    marks.pop_back();
    std::vector<ref> items(std::make_move_iterator(stack.begin() + static_cast<std::ptrdiff_t>(m)),
                           std::make_move_iterator(stack.end()));
    stack.resize(m);
    return items;
  }
  void memoize(uint64_t key) {
    if (memo.size() >= max_memo && !memo.count(key)) fail("too many memo entries");
    memo[key] = top();
  }
  ref get(uint64_t key) {
    auto it = memo.find(key);
    if (it == memo.end()) fail("memo entry " + std::to_string(key) + " does not exist");
    return it->second;
  }
  void global(const std::string& module, const std::string& name) {
    const std::string q = module + "." + name;
    if (!allowed_global(q))
      fail("Blocked unsafe global (" + (q.size() > 200 ? q.substr(0, 200) + "..." : q) + ") during pickle deserialization");
    auto g = make(value::kind::global);
    g->s = q;
    push(g);
  }
  ref tuple(std::vector<ref> items) {
    auto t = make(value::kind::tuple);
    for (const auto& x : items) nest(*t, x);
    t->items = std::move(items);
    return t;
  }
  // `child` goes inside `parent`: it is final from here on (a container filled after it was used, e.g. one
  // made to contain itself, is refused), and the nesting depth stays bounded.
  void nest(value& parent, const ref& child) {
    if (child.get() == &parent) fail("a " + describe(parent) + " inside itself");
    child->sealed = true;
    parent.depth = std::max(parent.depth, child->depth + 1);
    if (parent.depth > max_depth) fail("nesting deeper than " + std::to_string(max_depth));
  }
  void unsealed(const ref& v, const char* op) const {
    if (v->sealed) fail(std::string(op) + " on a " + describe(*v) + " that is already inside another value");
  }
  // A call of an admitted global (REDUCE) or a new object of an admitted class (NEWOBJ): a node, never run.
  // It holds a copy of the arguments' items, so a tuple serves one call (one memoized tuple copied for many
  // calls would cost its length times theirs).
  ref call(const ref& callable, const ref& args, value::kind as) {
    if (callable->k != value::kind::global) fail("only globals may be called, not a " + describe(*callable));
    if (args->k != value::kind::tuple) fail("call arguments must be a tuple, not a " + describe(*args));
    unsealed(args, "a call");
    args->sealed = true;
    auto c = make(as);
    c->s = callable->s;
    for (const auto& x : args->items) nest(*c, x);
    c->items = args->items;
    return c;
  }
  void add_items(const ref& container, std::vector<ref> items) {
    if (container->k != value::kind::list) fail("APPEND(S) to a " + describe(*container));
    unsealed(container, "APPEND(S)");
    for (auto& x : items) {
      nest(*container, x);
      container->items.push_back(std::move(x));
    }
  }
  void set_items(const ref& container, std::vector<ref> kv) {
    if (container->k != value::kind::dict) fail("SETITEM(S) on a " + describe(*container));
    unsealed(container, "SETITEM(S)");
    if (kv.size() % 2) fail("SETITEMS with an odd number of values");
    for (size_t k = 0; k < kv.size(); k += 2) {
      nest(*container, kv[k]);
      nest(*container, kv[k + 1]);
      container->entries.emplace_back(std::move(kv[k]), std::move(kv[k + 1]));
    }
  }

  ref run() {
    while (true) {
      need(1);
      const auto op = static_cast<uint8_t>(in[pos++]);
      switch (op) {
        case 0x80: {  // PROTO
          const auto v = le(1);
          // Protocol 2 pickles bytes as a call of _codecs.encode, which is not admitted: 3 to 5 (torch's default is 4+).
          if (v < 3 || v > 5) fail("protocol " + std::to_string(v) + " is not supported (3 to 5)");
          break;
        }
        case 0x95: le(8); break;  // FRAME: a length hint only
        case '.': {               // STOP
          ref v = pop();
          if (!stack.empty() || !marks.empty()) fail("values left on the stack at STOP");
          if (pos != in.size()) fail(std::to_string(in.size() - pos) + " bytes after STOP");
          return v;
        }
        case '(': marks.push_back(stack.size()); break;  // MARK
        case '0': pop(); break;                           // POP
        case '1': pop_mark(); break;                      // POP_MARK
        case '2': push(top()); break;                     // DUP
        case 'N': push(make(value::kind::none)); break;
        case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
          auto v = make(value::kind::boolean);
          v->b = op == 0x88;
          push(v);
          break;
        }
        case 'K': case 'M': case 'J': {  // BININT1, BININT2, BININT
          auto v = make(value::kind::integer);
          const size_t n = op == 'K' ? 1 : op == 'M' ? 2 : 4;
          const uint64_t raw = le(n);
          v->i = n == 4 ? static_cast<int32_t>(static_cast<uint32_t>(raw)) : static_cast<int64_t>(raw);
          push(v);
          break;
        }
        case 0x8a: {  // LONG1
          const auto n = le(1);
          if (n > 8) fail("an integer of " + std::to_string(n) + " bytes is too large");
          const std::string b = take(n);
          uint64_t raw = 0;
          for (size_t k = 0; k < n; ++k) raw |= static_cast<uint64_t>(static_cast<uint8_t>(b[k])) << (8 * k);
          if (n > 0 && n < 8 && (static_cast<uint8_t>(b[n - 1]) & 0x80)) raw |= ~uint64_t{0} << (8 * n);  // sign-extend
          auto v = make(value::kind::integer);
          v->i = static_cast<int64_t>(raw);
          push(v);
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          need(8);
          uint64_t raw = 0;
          for (size_t k = 0; k < 8; ++k) raw = (raw << 8) | static_cast<uint8_t>(in[pos + k]);
          pos += 8;
          auto v = make(value::kind::floating);
          std::memcpy(&v->f, &raw, 8);
          push(v);
          break;
        }
        case 0x8c: case 'X': case 0x8d: {  // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
          auto v = make(value::kind::string);
          v->s = take(le(op == 0x8c ? 1 : op == 'X' ? 4 : 8));
          push(v);
          break;
        }
        case 'C': case 'B': case 0x8e: {  // SHORT_BINBYTES, BINBYTES, BINBYTES8
          auto v = make(value::kind::bytes);
          v->s = take(le(op == 'C' ? 1 : op == 'B' ? 4 : 8));
          push(v);
          break;
        }
        case ']': push(make(value::kind::list)); break;   // EMPTY_LIST
        case '}': push(make(value::kind::dict)); break;   // EMPTY_DICT
        case ')': push(make(value::kind::tuple)); break;  // EMPTY_TUPLE
        case 't': push(tuple(pop_mark())); break;         // TUPLE
        case 0x85: case 0x86: case 0x87: {                // TUPLE1..3
          const size_t n = op - 0x84;
          std::vector<ref> items(n);
          for (size_t k = n; k-- > 0;) items[k] = pop();
          push(tuple(std::move(items)));
          break;
        }
        case 'l': {  // LIST
          auto l = make(value::kind::list);
          add_items(l, pop_mark());
          push(l);
          break;
        }
        case 'd': {  // DICT
          auto d = make(value::kind::dict);
          set_items(d, pop_mark());
          push(d);
          break;
        }
        case 'a': {  // APPEND
          ref x = pop();
          add_items(top(), {std::move(x)});
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          add_items(top(), std::move(items));
          break;
        }
        case 's': {  // SETITEM
          ref v = pop(), k = pop();
          set_items(top(), {std::move(k), std::move(v)});
          break;
        }
        case 'u': {  // SETITEMS
          auto kv = pop_mark();
          set_items(top(), std::move(kv));
          break;
        }
        case 0x94: memoize(memo.size()); break;       // MEMOIZE
        case 'q': memoize(le(1)); break;              // BINPUT
        case 'r': memoize(le(4)); break;              // LONG_BINPUT
        case 'h': push(get(le(1))); break;            // BINGET
        case 'j': push(get(le(4))); break;            // LONG_BINGET
        case 'c': {                                   // GLOBAL "module\nname\n"
          const std::string module = line();
          global(module, line());
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          ref name = pop(), module = pop();
          if (module->k != value::kind::string || name->k != value::kind::string) fail("STACK_GLOBAL needs two strings");
          global(module->s, name->s);
          break;
        }
        case 'R': {  // REDUCE
          ref args = pop(), callable = pop();
          push(call(callable, args, value::kind::call));
          break;
        }
        case 0x81: {  // NEWOBJ
          ref args = pop(), cls = pop();
          push(call(cls, args, value::kind::object));
          break;
        }
        case 'b': {  // BUILD: an object's state (a dict), copied: a dict gives its state to one object
          ref state = pop();
          const ref& obj = top();
          // NEWOBJ's objects, and SimpleNamespace() (pickled as a call, then its state)
          const bool buildable = obj->k == value::kind::object || (obj->k == value::kind::call && obj->s == "types.SimpleNamespace");
          if (!buildable) fail("BUILD on a " + describe(*obj));
          unsealed(obj, "BUILD");
          if (state->k != value::kind::dict) fail("BUILD state must be a dict, not a " + describe(*state));
          unsealed(state, "BUILD state");
          nest(*obj, state);
          obj->entries = state->entries;
          break;
        }
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          fail(std::string("opcode ") + hex + " is not allowed in a tensor payload");
        }
      }
    }
  }
};

}  // namespace

bool allowed_global(std::string_view q) {
  for (const char* a : allowed)
    if (q == a) return true;
  return false;
}

ref read(std::string_view bytes) {
  if (bytes.empty()) throw bad_pickle("empty pickle");
  reader r;
  r.in = bytes;
  return r.run();
}

std::string describe(const value& v) {
  switch (v.k) {
    case value::kind::none: return "None";
    case value::kind::boolean: return "bool";
    case value::kind::integer: return "int";
    case value::kind::floating: return "float";
    case value::kind::string: return "str";
    case value::kind::bytes: return "bytes";
    case value::kind::list: return "list";
    case value::kind::tuple: return "tuple";
    case value::kind::dict: return "dict";
    case value::kind::global: return "global " + v.s;
    case value::kind::call: return "call of " + v.s;
    case value::kind::object: return v.s + " object";
  }
  return "value";
}

}  // namespace refit::net::pickle

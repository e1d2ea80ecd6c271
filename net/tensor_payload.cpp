#include "net/tensor_payload.hpp"

#include <algorithm>
#include <map>
#include <set>

#include "net/json_codec.hpp"
#include "net/pickle_reader.hpp"

namespace refit::net {

namespace {

using pickle::value;
using kind = pickle::value::kind;

struct payload_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& why) { throw payload_error(why); }

// Strict standard-alphabet base64 (SGLang decodes with validate=True): padding only at the end.
std::string base64_decode(std::string_view in) {
  auto sextet = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (in.size() % 4 != 0) fail("not base64 (its length " + std::to_string(in.size()) + " is not a multiple of 4)");
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    size_t pad = 0;
    for (size_t k = 0; k < 4; ++k) {
      const char c = in[i + k];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad || (v[k] = sextet(c)) < 0) fail("not base64 (byte " + std::to_string(i + k) + ")");
    }
    const uint32_t n = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
    out.push_back(static_cast<char>(n >> 16));
    if (pad < 2) out.push_back(static_cast<char>((n >> 8) & 0xff));
    if (pad < 1) out.push_back(static_cast<char>(n & 0xff));
  }
  return out;
}

const value& arg(const value& call, size_t i, kind want, const char* what) {
  if (i >= call.items.size()) fail(call.s + ": missing argument " + std::to_string(i) + " (" + what + ")");
  const value& v = *call.items[i];
  if (v.k != want) fail(call.s + ": argument " + std::to_string(i) + " (" + what + ") is a " + pickle::describe(v));
  return v;
}

int64_t non_negative(const value& v, const std::string& what) {
  if (v.k != kind::integer || v.i < 0) fail(what + " must be a non-negative integer, not " + pickle::describe(v));
  return v.i;
}

uint64_t element_bytes(const std::string& dtype) {
  if (dtype == "float64" || dtype == "int64") return 8;
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16" || dtype == "bfloat16" || dtype == "int16") return 2;
  return 1;  // uint8, int8, bool, float8
}

// "torch.bfloat16" -> "bfloat16"
std::string dtype_of(const value& v, const std::string& what) {
  if (v.k == kind::global && v.s.rfind("torch.", 0) == 0 && v.s != "torch.Size" && v.s != "torch.Tensor") return v.s.substr(6);
  if (v.k == kind::string) {  // SGLang's metadata may carry "torch.bfloat16" or "bfloat16"
    const auto dot = v.s.rfind('.');
    const std::string name = dot == std::string::npos ? v.s : v.s.substr(dot + 1);
    if (pickle::allowed_global("torch." + name)) return name;
  }
  fail(what + " is not a torch dtype: " + pickle::describe(v) + (v.k == kind::string ? " '" + v.s + "'" : ""));
}

// torch.Size((2, 3)) or a plain tuple of non-negative integers, at most 64 of them.
std::vector<int64_t> ints(const value& v, const std::string& what) {
  const value* t = &v;
  if (v.k == kind::call && v.s == "torch.Size") {
    if (v.items.size() != 1) fail(what + ": torch.Size takes one tuple");
    t = v.items[0].get();
  }
  if (t->k != kind::tuple && t->k != kind::list) fail(what + " must be a tuple of integers, not " + pickle::describe(*t));
  if (t->items.size() > 64) fail(what + " has " + std::to_string(t->items.size()) + " dimensions (at most 64)");
  std::vector<int64_t> out;
  for (const auto& x : t->items) out.push_back(non_negative(*x, what));
  return out;
}

struct decoder {
  msg::shared_payload out;
  std::map<const value*, uint32_t> storages;  // the same storage node (pickle memo) is one storage

  uint32_t storage(const value& node, uint64_t size_bytes, msg::shared_storage s) {
    auto it = storages.find(&node);
    if (it != storages.end()) return it->second;
    s.size_bytes = size_bytes;
    out.storages.push_back(std::move(s));
    const auto index = static_cast<uint32_t>(out.storages.size() - 1);
    storages[&node] = index;
    return index;
  }

  // rebuild_storage_filename(UntypedStorage, manager: bytes, handle: bytes, size: int[, dtype])
  uint32_t shm_storage(const value& untyped) {
    if (untyped.k != kind::call || untyped.s != "torch.multiprocessing.reductions.rebuild_storage_filename")
      fail("a CPU tensor's storage must be shared by file name (torch.multiprocessing.set_sharing_strategy(\"file_system\") in the "
           "trainer), not " + pickle::describe(untyped));
    arg(untyped, 0, kind::global, "storage class");
    if (untyped.items.at(0)->s != "torch.storage.UntypedStorage") fail("storage class must be torch.storage.UntypedStorage");
    arg(untyped, 1, kind::bytes, "manager handle");  // the trainer's torch_shm_manager socket: never used
    const value& handle = arg(untyped, 2, kind::bytes, "shared memory name");
    const int64_t size = non_negative(arg(untyped, 3, kind::integer, "size"), "storage size");
    msg::shared_storage s;
    s.kind = msg::storage_kind::shared_memory;
    s.handle = handle.s;
    return storage(untyped, static_cast<uint64_t>(size), std::move(s));
  }

  msg::shared_tensor tensor(const value& v, const std::string& name) {
    if (v.k != kind::call) fail("tensor '" + name + "' is a " + pickle::describe(v) + ", not a shared torch tensor");
    msg::shared_tensor t;
    t.name = name;
    if (v.s == "torch.multiprocessing.reductions.rebuild_tensor") {
      const value& cls = arg(v, 0, kind::global, "tensor class");
      if (cls.s != "torch.Tensor" && cls.s != "torch.nn.parameter.Parameter") fail("tensor '" + name + "': class " + cls.s);
      const value& typed = arg(v, 1, kind::call, "storage");
      if (typed.s != "torch.multiprocessing.reductions.rebuild_typed_storage" || typed.items.size() != 2)
        fail("tensor '" + name + "': storage must come from rebuild_typed_storage, not " + pickle::describe(typed));
      t.dtype = dtype_of(*typed.items[1], "tensor '" + name + "': dtype");
      t.storage = shm_storage(*typed.items[0]);
      const value& meta = arg(v, 2, kind::tuple, "metadata");
      if (meta.items.size() != 4) fail("tensor '" + name + "': metadata must be (offset, size, stride, requires_grad)");
      const int64_t offset = non_negative(*meta.items[0], "tensor '" + name + "': storage offset");
      t.shape = ints(*meta.items[1], "tensor '" + name + "': size");
      t.stride = ints(*meta.items[2], "tensor '" + name + "': stride");
      t.offset_bytes = static_cast<uint64_t>(offset);  // in elements here: decode_tensor_payload scales it
      offsets_in_elements.insert(out.tensors.size());
      return t;
    }
    if (v.s == "torch.multiprocessing.reductions.rebuild_cuda_tensor" || v.s == "sglang.srt.utils.patch_torch._rebuild_cuda_tensor_modified") {
      // (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, size_bytes, offset_bytes, requires_grad,
      //  ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
      if (v.items.size() != 15) fail("tensor '" + name + "': " + v.s + " takes 15 arguments, got " + std::to_string(v.items.size()));
      const value& cls = arg(v, 0, kind::global, "tensor class");
      if (cls.s != "torch.Tensor" && cls.s != "torch.nn.parameter.Parameter") fail("tensor '" + name + "': class " + cls.s);
      t.shape = ints(*v.items[1], "tensor '" + name + "': size");
      t.stride = ints(*v.items[2], "tensor '" + name + "': stride");
      const int64_t offset = non_negative(*v.items[3], "tensor '" + name + "': storage offset");
      t.dtype = dtype_of(*v.items[5], "tensor '" + name + "': dtype");
      const value& device = *v.items[6];
      const value& handle = arg(v, 7, kind::bytes, "IPC handle");
      const int64_t size = non_negative(*v.items[8], "tensor '" + name + "': storage size");
      const int64_t storage_offset = non_negative(*v.items[9], "tensor '" + name + "': storage offset in bytes");
      const value& event = *v.items[13];
      msg::shared_storage s;
      s.kind = msg::storage_kind::cuda_ipc;
      s.handle = handle.s;
      s.offset_bytes = static_cast<uint64_t>(storage_offset);
      if (device.k == kind::integer) s.device = std::to_string(non_negative(device, "device"));
      else if (device.k == kind::string) s.device = device.s;
      else fail("tensor '" + name + "': device must be an ordinal or a GPU UUID, not " + pickle::describe(device));
      if (event.k == kind::bytes) s.event_handle = event.s;
      else if (event.k != kind::none) fail("tensor '" + name + "': event handle must be bytes or None");
      // The storage is the same when the handle and offset are (views of one tensor).
      t.storage = storage(*v.items[7], static_cast<uint64_t>(size), std::move(s));
      t.offset_bytes = static_cast<uint64_t>(offset);
      offsets_in_elements.insert(out.tensors.size());
      return t;
    }
    fail("tensor '" + name + "' is rebuilt by " + v.s + ", which refit does not open");
  }

  std::set<size_t> offsets_in_elements;

  // Each (module, name) once: the pickle memo lets one long name be referenced many times, and a duplicate
  // would have been ambiguous anyway.
  std::set<std::pair<std::string, std::string>> seen;
  void add(msg::shared_tensor t, const std::string& module) {
    if (!seen.emplace(module, t.name).second)
      fail("tensor '" + t.name + "'" + (module.empty() ? "" : " of module '" + module + "'") + " appears twice in the payload");
    t.module = module;
    out.tensors.push_back(std::move(t));
  }

  void pairs(const value& list, const std::string& module) {
    for (const auto& item : list.items) {
      if ((item->k != kind::tuple && item->k != kind::list) || item->items.size() != 2 || item->items[0]->k != kind::string)
        fail("each entry must be a (name, tensor) pair, not a " + pickle::describe(*item));
      add(tensor(*item->items[1], item->items[0]->s), module);
    }
  }

  static const value* field(const value& v, const std::string& key) {
    for (const auto& [k, x] : v.entries)
      if (k->k == kind::string && k->s == key) return x.get();
    return nullptr;
  }

  void bucket(const value& v, const std::string& module) {
    if (v.k != kind::dict) fail("flattened_bucket payload must be a dict with 'flattened_tensor' and 'metadata'.");
    const value* flat = field(v, "flattened_tensor");
    const value* meta = field(v, "metadata");
    if (!flat || !meta) fail("flattened_bucket payload missing 'flattened_tensor' or 'metadata'.");
    if (meta->k != kind::list) fail("flattened_bucket 'metadata' must be a list.");
    msg::shared_tensor whole = tensor(*flat, "flattened_tensor");
    if (whole.dtype != "uint8" || whole.shape.size() != 1 || whole.stride != std::vector<int64_t>{1})
      fail("flattened_bucket 'flattened_tensor' must be a contiguous 1-D uint8 tensor");
    offsets_in_elements.erase(out.tensors.size());
    const uint64_t base = whole.offset_bytes;  // uint8: elements are bytes
    const uint64_t length = static_cast<uint64_t>(whole.shape[0]);
    for (const auto& m : meta->items) {
      const bool metadata = (m->k == kind::object || m->k == kind::call) &&
                            (m->s == "sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata" || m->s == "types.SimpleNamespace");
      if (!metadata)
        fail("flattened_bucket metadata entries must be FlattenedTensorMetadata, not " + pickle::describe(*m));
      const value* name = field(*m, "name");
      const value* shape = field(*m, "shape");
      const value* dtype = field(*m, "dtype");
      const value* start = field(*m, "start_idx");
      const value* end = field(*m, "end_idx");
      if (!name || name->k != kind::string || !shape || !dtype || !start || !end)
        fail("flattened_bucket metadata needs name, shape, dtype, start_idx and end_idx");
      msg::shared_tensor t;
      t.name = name->s;
      t.dtype = dtype_of(*dtype, "flattened_bucket '" + t.name + "': dtype");
      t.shape = ints(*shape, "flattened_bucket '" + t.name + "': shape");
      const int64_t b = non_negative(*start, "flattened_bucket '" + t.name + "': start_idx");
      const int64_t e = non_negative(*end, "flattened_bucket '" + t.name + "': end_idx");
      if (e < b || static_cast<uint64_t>(e) > length)
        fail("flattened_bucket '" + t.name + "': bytes [" + std::to_string(b) + ", " + std::to_string(e) + ") lie outside the " +
             std::to_string(length) + "-byte bucket");
      t.stride.assign(t.shape.size(), 1);
      for (size_t k = t.shape.size(); k-- > 1;) t.stride[k - 1] = t.stride[k] * std::max<int64_t>(t.shape[k], 1);
      uint64_t bytes = element_bytes(t.dtype);
      for (int64_t d : t.shape) {
        if (d != 0 && bytes > (uint64_t{1} << 62) / static_cast<uint64_t>(d)) fail("flattened_bucket '" + t.name + "': shape too large");
        bytes *= static_cast<uint64_t>(d);
      }
      if (bytes != static_cast<uint64_t>(e - b))
        fail("flattened_bucket '" + t.name + "': shape and dtype make " + std::to_string(bytes) + " bytes, but start_idx/end_idx give " +
             std::to_string(e - b));
      t.offset_bytes = base + static_cast<uint64_t>(b);
      t.storage = whole.storage;
      add(std::move(t), module);
    }
  }

  void module_payload(const value& v, const std::string& module, bool flattened) {
    if (flattened) return bucket(v, module);
    if (v.k != kind::list && v.k != kind::tuple)
      fail("Unsupported module payload type for load_format=None: " + pickle::describe(v));
    pairs(v, module);
  }
};

}  // namespace

msg::shared_payload decode_tensor_payload(std::string_view base64, bool flattened_bucket) {
  try {
    const std::string bytes = base64_decode(base64);
    const pickle::ref root = pickle::read(bytes);
    decoder d;
    const bool single_bucket = flattened_bucket && root->k == kind::dict && decoder::field(*root, "flattened_tensor");
    if (root->k == kind::dict && !single_bucket) {
      std::set<std::string> modules;
      for (const auto& [k, v] : root->entries) {
        if (k->k != kind::string) fail("a dict payload maps module names to payloads; a key is a " + pickle::describe(*k));
        if (!modules.insert(k->s).second) fail("module '" + k->s + "' appears twice in the payload");
        d.module_payload(*v, k->s, flattened_bucket);
      }
    } else {
      d.module_payload(*root, "", flattened_bucket);
    }
    // Offsets of rebuilt tensors are in elements: to bytes.
    for (size_t i : d.offsets_in_elements) {
      auto& t = d.out.tensors.at(i);
      const uint64_t size = element_bytes(t.dtype);
      if (t.offset_bytes > (uint64_t{1} << 60) / size) fail("tensor '" + t.name + "': storage offset too large");
      t.offset_bytes *= size;
    }
    if (d.out.tensors.empty()) fail("the payload holds no tensor");
    return std::move(d.out);
  } catch (const pickle::bad_pickle& e) {
    throw bad_request(std::string("Failed to deserialize serialized_named_tensors: ") + e.what());
  } catch (const payload_error& e) {
    throw bad_request(std::string("Failed to deserialize serialized_named_tensors: ") + e.what());
  }
}

}  // namespace refit::net

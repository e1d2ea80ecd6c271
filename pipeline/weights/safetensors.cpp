#include "pipeline/weights/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <ostream>
#include <set>

#include <nlohmann/json.hpp>

namespace refit::weights {

using json = nlohmann::json;

std::string_view to_string(weight_errc code) {
  switch (code) {
    case weight_errc::io_error: return "io_error";
    case weight_errc::file_too_small: return "file_too_small";
    case weight_errc::header_too_large: return "header_too_large";
    case weight_errc::header_out_of_file: return "header_out_of_file";
    case weight_errc::header_not_utf8: return "header_not_utf8";
    case weight_errc::header_bad_start: return "header_bad_start";
    case weight_errc::header_bad_json: return "header_bad_json";
    case weight_errc::header_not_object: return "header_not_object";
    case weight_errc::duplicate_tensor: return "duplicate_tensor";
    case weight_errc::entry_not_object: return "entry_not_object";
    case weight_errc::unknown_dtype: return "unknown_dtype";
    case weight_errc::bad_shape: return "bad_shape";
    case weight_errc::bad_offsets: return "bad_offsets";
    case weight_errc::length_mismatch: return "length_mismatch";
    case weight_errc::offsets_out_of_data: return "offsets_out_of_data";
    case weight_errc::tiling_gap: return "tiling_gap";
    case weight_errc::tiling_overlap: return "tiling_overlap";
    case weight_errc::trailing_bytes: return "trailing_bytes";
    case weight_errc::bad_metadata: return "bad_metadata";
    case weight_errc::unknown_entry_field: return "unknown_entry_field";
    case weight_errc::bad_model_index: return "bad_model_index";
    case weight_errc::missing_component: return "missing_component";
    case weight_errc::bad_shard_index: return "bad_shard_index";
    case weight_errc::missing_shard: return "missing_shard";
    case weight_errc::shard_mismatch: return "shard_mismatch";
    case weight_errc::tensor_in_two_shards: return "tensor_in_two_shards";
    case weight_errc::no_weights: return "no_weights";
    case weight_errc::unknown_module: return "unknown_module";
    case weight_errc::unconvertible_dtype: return "unconvertible_dtype";
    case weight_errc::file_changed: return "file_changed";
    case weight_errc::outside_root: return "outside_root";
  }
  return "unknown";
}

std::ostream& operator<<(std::ostream& os, weight_errc code) { return os << to_string(code); }

uint64_t tensor_entry::numel() const {
  uint64_t n = 1;
  for (auto d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

const tensor_entry* safetensors_header::find(std::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const tensor_entry& t, std::string_view n) { return t.name < n; });
  return it != tensors.end() && it->name == name ? &*it : nullptr;
}

namespace {

[[noreturn]] void fail(weight_errc code, std::string_view label, const std::string& what) {
  throw weight_error(code, std::string(label) + ": " + what);
}

[[noreturn]] void fail_tensor(weight_errc code, std::string_view label, std::string_view tensor,
                              const std::string& what) {
  throw weight_error(code, std::string(label) + ": tensor '" + std::string(tensor) + "': " + what);
}

// Offset of the first byte that breaks UTF-8, or npos.
size_t find_invalid_utf8(const unsigned char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are not UTF-8.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
      return i;
    i += len;
  }
  return std::string::npos;
}

tensor_entry parse_entry(std::string_view label, const std::string& name, const json& v,
                         uint64_t data_size) {
  if (!v.is_object())
    fail_tensor(weight_errc::entry_not_object, label, name,
                std::string("entry must be an object with dtype, shape and data_offsets, got ") + v.type_name());
  for (const auto& [k, _] : v.items())
    if (k != "dtype" && k != "shape" && k != "data_offsets")
      fail_tensor(weight_errc::unknown_entry_field, label, name,
                  "unknown field '" + k + "' (expected only dtype, shape, data_offsets)");
  tensor_entry t;
  t.name = name;

  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string())
    fail_tensor(weight_errc::unknown_dtype, label, name, "missing or non-string 'dtype'");
  auto parsed = parse_dtype(dt->get_ref<const std::string&>());
  if (!parsed)
    fail_tensor(weight_errc::unknown_dtype, label, name, "unknown dtype '" + dt->get<std::string>() + "'");
  t.type = *parsed;

  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array())
    fail_tensor(weight_errc::bad_shape, label, name, "missing 'shape' or not an array");
  // numel * bits must not overflow u64; track it as we go.
  unsigned __int128 bits = dtype_bits(t.type);
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail_tensor(weight_errc::bad_shape, label, name, "shape " + sh->dump() + " has an entry that is not a non-negative integer");
    t.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    bits *= d.get<uint64_t>();
    if (bits > static_cast<unsigned __int128>(std::numeric_limits<uint64_t>::max()))
      fail_tensor(weight_errc::bad_shape, label, name, "shape " + sh->dump() + " overflows the byte length");
  }

  auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    fail_tensor(weight_errc::bad_offsets, label, name, "data_offsets must be [begin, end] with non-negative integers");
  t.begin = (*off)[0].get<uint64_t>();
  t.end = (*off)[1].get<uint64_t>();
  if (t.begin > t.end)
    fail_tensor(weight_errc::bad_offsets, label, name,
                "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before begin");
  if (bits % 8 != 0)
    fail_tensor(weight_errc::length_mismatch, label, name,
                "packed dtype " + std::string(dtype_name(t.type)) + " with shape " + sh->dump() + " does not fill whole bytes");
  uint64_t want = static_cast<uint64_t>(bits / 8);
  if (t.end - t.begin != want)
    fail_tensor(weight_errc::length_mismatch, label, name,
                "data_offsets cover " + std::to_string(t.end - t.begin) + " bytes but " +
                    std::string(dtype_name(t.type)) + " shape " + sh->dump() + " needs " + std::to_string(want));
  if (t.end > data_size)
    fail_tensor(weight_errc::offsets_out_of_data, label, name,
                "data_offsets end " + std::to_string(t.end) + " lies past the data area (" +
                    std::to_string(data_size) + " bytes)");
  return t;
}

}  // namespace

safetensors_header parse_header(std::string_view label, std::span<const std::byte> prefix, uint64_t file_size) {
  if (file_size < 8 || prefix.size() < 8)
    fail(weight_errc::file_too_small, label, "file has " + std::to_string(file_size) + " bytes, fewer than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(prefix[i]);
  // Until the header has proven to be a JSON object, nothing read from the file goes into a message: a
  // file that is not a safetensors file at all must not have its bytes echoed (the length field is its
  // first 8 bytes).
  if (n > max_header_bytes)
    fail(weight_errc::header_too_large, label,
         "not a safetensors file: its header length field is implausible (above the limit of " + std::to_string(max_header_bytes) +
             " bytes; " + std::to_string(file_size) + " byte file)");
  if (8 + n > file_size)
    fail(weight_errc::header_out_of_file, label,
         "not a safetensors file: its header length field runs past the end of the file (" + std::to_string(file_size) +
             " byte file)");
  if (prefix.size() < 8 + n)
    fail(weight_errc::io_error, label, "short read of the header");

  const auto* hdr = reinterpret_cast<const unsigned char*>(prefix.data() + 8);
  if (auto bad = find_invalid_utf8(hdr, n); bad != std::string::npos)
    fail(weight_errc::header_not_utf8, label, "header is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  if (n == 0 || hdr[0] != '{')
    fail(weight_errc::header_bad_start, label, "header does not start with '{'");

  // JSON lets object keys repeat (nlohmann keeps the last); tensor names must not, so a SAX pass finds them.
  struct dup_finder : nlohmann::json_sax<json> {
    int depth = 0;
    std::set<std::string> names;
    std::string duplicate;
    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(number_integer_t) override { return true; }
    bool number_unsigned(number_unsigned_t) override { return true; }
    bool number_float(number_float_t, const string_t&) override { return true; }
    bool string(string_t&) override { return true; }
    bool binary(binary_t&) override { return true; }
    bool start_object(std::size_t) override { ++depth; return true; }
    bool key(string_t& k) override {
      if (depth == 1 && !names.insert(k).second) { duplicate = k; return false; }
      return true;
    }
    bool end_object() override { --depth; return true; }
    bool start_array(std::size_t) override { ++depth; return true; }
    bool end_array() override { --depth; return true; }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }
  } finder;
  const char* first = reinterpret_cast<const char*>(hdr);
  const char* last = first + n;
  bool ok = json::sax_parse(first, last, &finder, nlohmann::detail::input_format_t::json, /*strict=*/true);
  json doc = json::parse(first, last, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    // The position only: the parser's own message quotes the bytes it last read.
    std::string why = "not a safetensors file: its header is not valid JSON";
    try {
      [[maybe_unused]] json reparsed = json::parse(first, last);  // throws with the position
    } catch (const json::parse_error& e) {
      why += " (syntax error at header byte " + std::to_string(e.byte) + ")";
    } catch (const json::exception&) {
    }
    fail(weight_errc::header_bad_json, label, why);
  }
  if (!finder.duplicate.empty() && doc.is_object())
    fail_tensor(weight_errc::duplicate_tensor, label, finder.duplicate, "name appears twice in the header");
  if (!ok) fail(weight_errc::header_bad_json, label, "not a safetensors file: its header is not valid JSON");
  if (!doc.is_object())
    fail(weight_errc::header_not_object, label, std::string("header must be a JSON object, got ") + doc.type_name());

  safetensors_header h;
  h.header_len = n;
  h.data_offset = 8 + n;
  h.data_size = file_size - h.data_offset;
  for (auto& [key, value] : doc.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        fail(weight_errc::bad_metadata, label, std::string("__metadata__ must be a map of strings, got ") + value.type_name());
      for (auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          fail(weight_errc::bad_metadata, label, "__metadata__ value of '" + mk + "' must be a string, got " + mv.type_name());
        h.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(label, key, value, h.data_size));
  }

  // The tensors must tile the data area: sorted by offsets, each starts where the previous ended.
  std::vector<const tensor_entry*> by_offset;
  by_offset.reserve(h.tensors.size());
  for (const auto& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const tensor_entry* a, const tensor_entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expect = 0;
  const tensor_entry* prev = nullptr;
  for (const auto* t : by_offset) {
    if (t->begin > expect)
      fail_tensor(weight_errc::tiling_gap, label, t->name,
                  "starts at data offset " + std::to_string(t->begin) + " leaving a gap of " +
                      std::to_string(t->begin - expect) + " bytes after " +
                      (prev ? "tensor '" + prev->name + "'" : std::string("the start of the data area")));
    if (t->begin < expect)
      fail_tensor(weight_errc::tiling_overlap, label, t->name,
                  "data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
                      "] overlap tensor '" + prev->name + "' which ends at " + std::to_string(expect));
    expect = t->end;
    prev = t;
  }
  if (expect != h.data_size)
    fail(weight_errc::trailing_bytes, label,
         "tensors cover " + std::to_string(expect) + " bytes of the data area but it holds " +
             std::to_string(h.data_size) + " (trailing bytes after the last tensor)");

  std::sort(h.tensors.begin(), h.tensors.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return h;
}

// ---------------------------------------------------------------------------------------------
// safetensors_file

safetensors_file safetensors_file::open(const std::filesystem::path& path, const file_scope& scope) {
  safetensors_file f;
  f.path_ = path;
  f.scope_ = scope;
  const std::string label = path.string();
  f.fd_ = scope.open(path, O_RDONLY).release();
  struct stat st {};
  if (::fstat(f.fd_, &st) != 0) fail(weight_errc::io_error, label, std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(weight_errc::io_error, label, "not a regular file");
  f.file_size_ = static_cast<uint64_t>(st.st_size);
  f.mtime_ns_ = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  f.dev_ = static_cast<uint64_t>(st.st_dev);
  f.ino_ = static_cast<uint64_t>(st.st_ino);

  std::vector<std::byte> prefix(8);
  auto read_at = [&](std::byte* dst, size_t len, uint64_t at) {
    size_t done = 0;
    while (done < len) {
      ssize_t r = ::pread(f.fd_, dst + done, len - done, static_cast<off_t>(at + done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) fail(weight_errc::io_error, label, "short read of the header");
      done += static_cast<size_t>(r);
    }
  };
  if (f.file_size_ >= 8) {
    read_at(prefix.data(), 8, 0);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(prefix[i]);
    if (n <= max_header_bytes && 8 + n <= f.file_size_) {
      prefix.resize(8 + n);
      read_at(prefix.data() + 8, n, 8);
    }
  } else {
    prefix.clear();
  }
  f.header_ = parse_header(label, prefix, f.file_size_);

  if (f.file_size_ > 0) {
    void* m = ::mmap(nullptr, f.file_size_, PROT_READ, MAP_SHARED, f.fd_, 0);
    if (m == MAP_FAILED) fail(weight_errc::io_error, label, std::string("cannot mmap: ") + std::strerror(errno));
    f.map_ = static_cast<const std::byte*>(m);
  }
  return f;
}

safetensors_file::safetensors_file(safetensors_file&& o) noexcept
    : path_(std::move(o.path_)),
      scope_(std::move(o.scope_)),
      header_(std::move(o.header_)),
      file_size_(o.file_size_),
      mtime_ns_(o.mtime_ns_),
      dev_(o.dev_),
      ino_(o.ino_),
      fd_(o.fd_),
      map_(o.map_) {
  o.fd_ = -1;
  o.map_ = nullptr;
}

safetensors_file& safetensors_file::operator=(safetensors_file&& o) noexcept {
  if (this != &o) {
    this->~safetensors_file();
    new (this) safetensors_file(std::move(o));
  }
  return *this;
}

safetensors_file::~safetensors_file() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), file_size_);
  if (fd_ >= 0) ::close(fd_);
}

void safetensors_file::check_unchanged() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail(weight_errc::io_error, path_.string(), std::string("cannot stat: ") + std::strerror(errno));
  const int64_t mtime = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (static_cast<uint64_t>(st.st_size) != file_size_ || mtime != mtime_ns_)
    fail(weight_errc::file_changed, path_.string(),
         "the file was written while it was read (size " + std::to_string(file_size_) + " -> " + std::to_string(st.st_size) +
             " bytes, modification time changed " + std::to_string(mtime != mtime_ns_ ? (mtime - mtime_ns_) / 1000000 : 0) +
             " ms); what was read may mix old and new bytes. Write a checkpoint to new files and rename them into place");
}

bool safetensors_file::same_file(int fd) const {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_dev) == dev_ && static_cast<uint64_t>(st.st_ino) == ino_;
}

unique_fd safetensors_file::reopen(int flags) const {
  try {
    auto fd = scope_.try_open(path_, flags);
    if (fd && same_file(fd->get())) return std::move(*fd);
  } catch (const weight_error&) {
    // The path now leads elsewhere (or cannot be opened): the descriptor opened at open() is still read.
  }
  return unique_fd();
}

double safetensors_file::resident_fraction() const {
  if (!map_ || file_size_ == 0) return 1.0;
  // A sample of pages is enough to tell warm from cold, and asking about every page of a 16 GB file
  // costs tens of milliseconds on the load path.
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t pages = (file_size_ + page - 1) / page;
  const size_t samples = std::min<size_t>(pages, 256);
  size_t resident = 0;
  for (size_t k = 0; k < samples; ++k) {
    const size_t index = k * pages / samples;
    unsigned char v = 0;
    if (::mincore(const_cast<std::byte*>(map_) + index * page, page, &v) != 0) return 1.0;
    resident += v & 1;
  }
  return static_cast<double>(resident) / static_cast<double>(samples);
}

std::span<const std::byte> safetensors_file::bytes(const tensor_entry& t) const {
  return {map_ + header_.data_offset + t.begin, t.nbytes()};
}

// ---------------------------------------------------------------------------------------------
// safetensors_writer

safetensors_writer::safetensors_writer(std::filesystem::path path, std::vector<tensor_spec> tensors,
                                       std::map<std::string, std::string> metadata)
    : path_(std::move(path)) {
  const std::string label = path_.string();
  std::sort(tensors.begin(), tensors.end(), [](const tensor_spec& a, const tensor_spec& b) {
    if (dtype_bits(a.type) != dtype_bits(b.type)) return dtype_bits(a.type) > dtype_bits(b.type);
    return a.name < b.name;
  });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& s = tensors[i];
    if (s.name.empty() || s.name == "__metadata__")
      fail_tensor(weight_errc::bad_shape, label, s.name, "invalid tensor name");
    if (i > 0 && header.contains(s.name))
      fail_tensor(weight_errc::duplicate_tensor, label, s.name, "name given twice");
    unsigned __int128 bits = dtype_bits(s.type);
    for (auto d : s.shape) {
      if (d < 0) fail_tensor(weight_errc::bad_shape, label, s.name, "negative dimension");
      bits *= static_cast<uint64_t>(d);
    }
    if (bits % 8 != 0) fail_tensor(weight_errc::length_mismatch, label, s.name, "packed dtype does not fill whole bytes");
    tensor_entry e{s.name, s.type, s.shape, offset, offset + static_cast<uint64_t>(bits / 8)};
    offset = e.end;
    header[s.name] = {{"dtype", dtype_name(s.type)}, {"shape", s.shape}, {"data_offsets", {e.begin, e.end}}};
    layout_.tensors.push_back(std::move(e));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  layout_.header_len = text.size();
  layout_.data_offset = 8 + text.size();
  layout_.data_size = offset;
  layout_.metadata = std::move(metadata);
  std::sort(layout_.tensors.begin(), layout_.tensors.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  written_.assign(layout_.tensors.size(), 0);

  std::string tmpl = (path_.parent_path() / ("." + path_.filename().string() + ".refit-tmp-XXXXXX")).string();
  fd_ = ::mkstemp(tmpl.data());
  if (fd_ < 0) fail(weight_errc::io_error, label, std::string("cannot create temporary file: ") + std::strerror(errno));
  tmp_path_ = tmpl;
  ::fchmod(fd_, 0644);
  if (::ftruncate(fd_, static_cast<off_t>(layout_.data_offset + layout_.data_size)) != 0)
    fail(weight_errc::io_error, label, std::string("cannot size file: ") + std::strerror(errno));
  std::string prefix(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  prefix += text;
  if (::pwrite(fd_, prefix.data(), prefix.size(), 0) != static_cast<ssize_t>(prefix.size()))
    fail(weight_errc::io_error, label, std::string("cannot write header: ") + std::strerror(errno));
}

safetensors_writer::~safetensors_writer() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

void safetensors_writer::write(std::string_view name, std::span<const std::byte> data) {
  const std::string label = path_.string();
  const tensor_entry* t = layout_.find(name);
  if (!t) fail_tensor(weight_errc::unknown_module, label, name, "not part of this file's layout");
  if (data.size() != t->nbytes())
    fail_tensor(weight_errc::length_mismatch, label, name,
                "given " + std::to_string(data.size()) + " bytes, layout needs " + std::to_string(t->nbytes()));
  uint64_t done = 0;
  while (done < data.size()) {
    ssize_t w = ::pwrite(fd_, data.data() + done, data.size() - done,
                         static_cast<off_t>(layout_.data_offset + t->begin + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail_tensor(weight_errc::io_error, label, name, std::string("write failed: ") + std::strerror(errno));
    done += static_cast<uint64_t>(w);
  }
  written_[static_cast<size_t>(t - layout_.tensors.data())] = 1;
}

void safetensors_writer::finish() {
  const std::string label = path_.string();
  for (size_t i = 0; i < written_.size(); ++i)
    if (!written_[i]) fail_tensor(weight_errc::io_error, label, layout_.tensors[i].name, "was never written");
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail(weight_errc::io_error, label, std::string("close failed: ") + std::strerror(errno));
  }
  fd_ = -1;
  std::error_code ec;
  std::filesystem::rename(tmp_path_, path_, ec);
  if (ec) fail(weight_errc::io_error, label, "cannot rename temporary file into place: " + ec.message());
  finished_ = true;
}

std::vector<uint8_t> encode_safetensors(const tensor_spec& t, std::span<const std::byte> data) {
  unsigned __int128 bits = dtype_bits(t.type);
  for (auto d : t.shape) {
    if (d < 0) fail_tensor(weight_errc::bad_shape, "<memory>", t.name, "negative dimension");
    bits *= static_cast<uint64_t>(d);
  }
  if (bits % 8 != 0 || bits / 8 != data.size())
    fail_tensor(weight_errc::length_mismatch, "<memory>", t.name, "data of " + std::to_string(data.size()) + " bytes does not match the shape");
  json header = json::object();
  header[t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {0, data.size()}}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> out(8 + text.size() + data.size());
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + text.size(), data.data(), data.size());
  return out;
}

}  // namespace refit::weights

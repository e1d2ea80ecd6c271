#include "pipeline/weights/beneath.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace refit::weights {

namespace fs = std::filesystem;

unique_fd& unique_fd::operator=(unique_fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

unique_fd::~unique_fd() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

[[noreturn]] void fail(weight_errc code, const fs::path& where, const std::string& what) {
  throw weight_error(code, where.string() + ": " + what);
}

// Absolute, "." and ".." removed as text, no trailing separator.
fs::path normal(const fs::path& p) {
  std::error_code ec;
  fs::path out = (p.is_absolute() ? p : fs::absolute(p, ec)).lexically_normal();
  if (!out.has_filename() && out.has_parent_path() && out != out.root_path()) out = out.parent_path();
  return out;
}

// `p` relative to `root` when p lies inside it (component-wise: /data/ckpt does not contain /data/ckpt-evil).
std::optional<fs::path> inside(const fs::path& root, const fs::path& p) {
  auto [r, q] = std::mismatch(root.begin(), root.end(), p.begin(), p.end());
  if (r != root.end()) return std::nullopt;
  fs::path rel;
  for (; q != p.end(); ++q) rel /= *q;
  return rel.empty() ? fs::path(".") : rel;
}

long openat2_call(int dirfd, const char* path, int flags, uint64_t resolve) {
  open_how how{};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.resolve = resolve;
  for (int attempt = 0;; ++attempt) {
    const long fd = ::syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    // EAGAIN: a rename or mount raced the beneath walk; the kernel asks to retry.
    if (fd < 0 && (errno == EINTR || (errno == EAGAIN && attempt < 64))) continue;
    return fd;
  }
}

std::string list_roots(const std::vector<fs::path>& roots) {
  std::string out;
  for (const auto& r : roots) out += (out.empty() ? "" : ", ") + r.string();
  return out;
}

}  // namespace

bool beneath_supported() {
  static const bool supported = [] {
    const long fd = openat2_call(AT_FDCWD, "/", O_PATH, 0);
    if (fd >= 0) ::close(static_cast<int>(fd));
    return !(fd < 0 && errno == ENOSYS);
  }();
  return supported;
}

file_scope::file_scope(const std::vector<fs::path>& roots) {
  auto opened = std::make_shared<std::vector<root>>();
  for (const auto& r : roots) {
    std::error_code ec;
    fs::path canonical = fs::canonical(r, ec);
    if (ec) fail(weight_errc::io_error, r, "allowed model root cannot be resolved: " + ec.message());
    const int fd = ::open(canonical.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) fail(weight_errc::io_error, canonical, std::string("allowed model root cannot be opened: ") + std::strerror(errno));
    opened->push_back({std::move(canonical), unique_fd(fd)});
  }
  roots_ = std::move(opened);
}

std::vector<fs::path> file_scope::roots() const {
  std::vector<fs::path> out;
  if (roots_)
    for (const auto& r : *roots_) out.push_back(r.path);
  return out;
}

std::optional<unique_fd> file_scope::try_open(const fs::path& path, int flags) const {
  if (!roots_) {
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
    if (fd >= 0) return unique_fd(fd);
    if (errno == ENOENT || errno == ENOTDIR) return std::nullopt;
    fail(weight_errc::io_error, path, std::string("cannot open: ") + std::strerror(errno));
  }
  const fs::path p = normal(path);
  for (const auto& r : *roots_) {
    const auto rel = inside(r.path, p);
    if (!rel) continue;
    const long fd = openat2_call(r.fd.get(), rel->c_str(), flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS);
    if (fd >= 0) return unique_fd(static_cast<int>(fd));
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) return std::nullopt;
    if (err == EXDEV || err == ELOOP)
      fail(weight_errc::outside_root, path,
           "resolves outside the allowed model root " + r.path.string() +
               " (through '..' or a symlink; symlinks inside a checkpoint must be relative and stay inside the root)");
    if (err == ENOSYS)
      fail(weight_errc::io_error, path,
           "this kernel has no openat2 (Linux 5.6 or later), which refit needs to open files beneath --allowed-model-root; "
           "refusing to read it");
    fail(weight_errc::io_error, path, std::string("cannot open: ") + std::strerror(err));
  }
  fail(weight_errc::outside_root, path, "is outside the allowed model roots (" + list_roots(roots()) + ")");
}

unique_fd file_scope::open(const fs::path& path, int flags) const {
  auto fd = try_open(path, flags);
  if (!fd) fail(weight_errc::io_error, path, "does not exist");
  return std::move(*fd);
}

std::optional<struct stat> file_scope::stat(const fs::path& path) const {
  auto fd = try_open(path, O_PATH);
  if (!fd) return std::nullopt;
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0) fail(weight_errc::io_error, path, std::string("cannot stat: ") + std::strerror(errno));
  return st;
}

bool file_scope::is_directory(const fs::path& path) const {
  const auto st = stat(path);
  return st && S_ISDIR(st->st_mode);
}

bool file_scope::is_regular_file(const fs::path& path) const {
  const auto st = stat(path);
  return st && S_ISREG(st->st_mode);
}

std::vector<std::string> file_scope::list(const fs::path& dir) const {
  unique_fd fd = open(dir, O_RDONLY | O_DIRECTORY);
  DIR* d = ::fdopendir(fd.get());
  if (!d) fail(weight_errc::io_error, dir, std::string("cannot list: ") + std::strerror(errno));
  fd.release();  // closedir closes it
  std::vector<std::string> names;
  errno = 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
    errno = 0;
  }
  const int err = errno;
  ::closedir(d);
  if (err != 0) fail(weight_errc::io_error, dir, std::string("cannot list: ") + std::strerror(err));
  return names;
}

std::string file_scope::read_small_file(const fs::path& path, uint64_t max_bytes) const {
  unique_fd fd = open(path, O_RDONLY);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail(weight_errc::io_error, path, std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(weight_errc::io_error, path, "is not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    fail(weight_errc::io_error, path, "is " + std::to_string(st.st_size) + " bytes, more than the " + std::to_string(max_bytes) + " allowed");
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t r = ::pread(fd.get(), out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(weight_errc::io_error, path, std::string("cannot read: ") + std::strerror(errno));
    if (r == 0) break;  // shrank while read
    done += static_cast<size_t>(r);
  }
  out.resize(done);
  return out;
}

fs::path file_scope::admit(const fs::path& path) const {
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) resolved = fs::absolute(path, ec);  // e.g. a parent we may not read: judge the text
  resolved = normal(resolved);
  if (!roots_) return resolved;
  for (const auto& r : *roots_)
    if (inside(r.path, resolved)) return resolved;
  throw weight_error(weight_errc::outside_root, "'" + path.string() + "' resolves to '" + resolved.string() +
                                                    "', which is outside the allowed model roots (" + list_roots(roots()) + ")");
}

}  // namespace refit::weights

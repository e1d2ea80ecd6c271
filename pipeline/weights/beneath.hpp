// Opening the files of an update so that they cannot leave the allowed model roots (refit serve
// --allowed-model-root). The check is made by the kernel on the descriptor that is then read: each file is
// opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) relative to a descriptor of its root, so no
// "..", no symlink (of the path or inside the checkpoint, swapped in at any moment) and no /proc magic link
// reaches a file outside it. There is no check-then-open window.
//
// Symlinks inside a checkpoint must be relative and stay inside the root: RESOLVE_BENEATH refuses every
// absolute symlink, even one that points back into the root. (The model_path a client names is resolved
// first, absolute symlinks included, and must then lie in a root: see admit.)
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/weights/weight_error.hpp"

namespace refit::weights {

// An owned file descriptor.
class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(o.release()) {}
  unique_fd& operator=(unique_fd&& o) noexcept;
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd();

  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Where the files of one weight source may be opened: anywhere (the operator's own start model, a
// command-line tool), or only beneath the allowed roots. Cheap to copy (the root descriptors are shared).
class file_scope {
 public:
  file_scope() = default;  // anywhere
  // Restricted to `roots`, existing directories (canonical paths: a path is matched against them as text
  // before the kernel resolves it beneath the matching one). Each is opened once here (O_PATH); throws
  // weight_error(io_error) when one cannot be. An empty list restricts to nothing.
  explicit file_scope(const std::vector<std::filesystem::path>& roots);

  bool restricted() const { return roots_ != nullptr; }
  std::vector<std::filesystem::path> roots() const;

  // Opens `path` with `flags` (O_RDONLY, O_DIRECTORY, O_DIRECT, O_PATH...; O_CLOEXEC is added). Restricted:
  // `path` must be absolute and lie, as text after removing "." and "..", inside a root; it is opened
  // beneath that root's descriptor. Throws weight_error: outside_root when the path or anything it resolves
  // through leaves the root (or is an absolute symlink), io_error for any other failure (the message names
  // the path and errno's text, never file contents).
  unique_fd open(const std::filesystem::path& path, int flags) const;
  // Like open, but nullopt when the path does not exist (ENOENT, ENOTDIR): the escape checks still throw.
  std::optional<unique_fd> try_open(const std::filesystem::path& path, int flags) const;
  // fstat of what `path` resolves to (opened O_PATH, so a FIFO or device is never opened for reading), or
  // nullopt when it does not exist.
  std::optional<struct stat> stat(const std::filesystem::path& path) const;
  bool is_directory(const std::filesystem::path& path) const;
  bool is_regular_file(const std::filesystem::path& path) const;
  // The entry names of the directory `dir` (without "." and ".."), in directory order.
  std::vector<std::string> list(const std::filesystem::path& dir) const;
  // The whole content of a regular file of at most `max_bytes` (a JSON config, an index); throws
  // weight_error(io_error) for a larger or unreadable one.
  std::string read_small_file(const std::filesystem::path& path, uint64_t max_bytes = 64u << 20) const;

  // The path a client named, resolved (symlinks, "..", relative to the working directory), when it lies
  // in one of the roots (always, when not restricted). Throws weight_error(outside_root) saying where it
  // resolves and which roots are allowed.
  std::filesystem::path admit(const std::filesystem::path& path) const;

 private:
  struct root {
    std::filesystem::path path;
    unique_fd fd;
  };
  std::shared_ptr<const std::vector<root>> roots_;
};

// Whether this kernel has openat2 (Linux 5.6): without it a restricted scope refuses every open.
bool beneath_supported();

}  // namespace refit::weights

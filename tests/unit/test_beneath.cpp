// Opening an update's files beneath the allowed model roots (pipeline/weights/beneath.hpp), the Diffusers layout and
// safetensors reader through it, and error messages that never echo the bytes of a file that is not safetensors.
#define BOOST_TEST_MODULE beneath
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "pipeline/weights/beneath.hpp"
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/safetensors.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace refit::weights;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

std::string read_fd(int fd) {
  std::string out(4096, '\0');
  const ssize_t n = ::pread(fd, out.data(), out.size(), 0);
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

// The error code (and message) scope.open gives for `p`, or io_error's opposite when it opens.
std::pair<bool, weight_error> open_error(const file_scope& scope, const fs::path& p) {
  try {
    scope.open(p, O_RDONLY);
  } catch (const weight_error& e) {
    return {true, e};
  }
  return {false, weight_error(weight_errc::io_error, "")};
}

void check_outside(const file_scope& scope, const fs::path& p) {
  auto [failed, e] = open_error(scope, p);
  BOOST_TEST_REQUIRE(failed, p << " opened");
  BOOST_TEST(e.code() == weight_errc::outside_root, p << ": " << e.what());
}

// root/ holds a file and links of every kind; outside/ a private file.
struct tree {
  refit::test::temp_dir tmp;
  fs::path root = fs::canonical(tmp.path()) / "root", outside = fs::canonical(tmp.path()) / "outside";
  tree() {
    write(root / "ckpt" / "weights.bin", "inside");
    write(root / "other" / "file.txt", "other");
    write(outside / "private.bin", "TOPSECRETDATA");
    fs::create_directories(root.parent_path() / "rootx");
    write(root.parent_path() / "rootx" / "twin.bin", "twin");
    fs::create_symlink(outside / "private.bin", root / "ckpt" / "abs_out.bin");
    fs::create_symlink("../../outside/private.bin", root / "ckpt" / "rel_out.bin");
    fs::create_symlink("../other/file.txt", root / "ckpt" / "rel_in.txt");
    fs::create_symlink(root / "other" / "file.txt", root / "ckpt" / "abs_in.txt");
    fs::create_directory_symlink(outside, root / "dir_out");
    fs::create_directory_symlink("other", root / "dir_in");
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(the_kernel_has_openat2) { BOOST_TEST(beneath_supported()); }

BOOST_AUTO_TEST_CASE(files_inside_the_root_open_and_relative_links_inside_it_are_followed) {
  tree t;
  const file_scope scope({t.root});
  BOOST_TEST(scope.restricted());
  BOOST_TEST(read_fd(scope.open(t.root / "ckpt" / "weights.bin", O_RDONLY).get()) == "inside");
  BOOST_TEST(read_fd(scope.open(t.root / "ckpt" / "rel_in.txt", O_RDONLY).get()) == "other");
  BOOST_TEST(read_fd(scope.open(t.root / "dir_in" / "file.txt", O_RDONLY).get()) == "other");
  BOOST_TEST(read_fd(scope.open(t.root / "ckpt" / ".." / "other" / "file.txt", O_RDONLY).get()) == "other");
  BOOST_TEST(scope.read_small_file(t.root / "ckpt" / "weights.bin") == "inside");
  BOOST_TEST(scope.is_directory(t.root / "ckpt"));
  BOOST_TEST(scope.is_directory(t.root));
  BOOST_TEST(scope.is_regular_file(t.root / "ckpt" / "weights.bin"));
  BOOST_TEST(!scope.stat(t.root / "ckpt" / "missing.bin"));
  auto names = scope.list(t.root / "ckpt");
  std::sort(names.begin(), names.end());
  BOOST_TEST(names == (std::vector<std::string>{"abs_in.txt", "abs_out.bin", "rel_in.txt", "rel_out.bin", "weights.bin"}),
             boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(every_way_out_of_the_root_is_refused_on_the_open_itself) {
  tree t;
  const file_scope scope({t.root});
  check_outside(scope, t.root / "ckpt" / "abs_out.bin");        // absolute symlink out
  check_outside(scope, t.root / "ckpt" / "rel_out.bin");        // relative symlink out through ".."
  check_outside(scope, t.root / "dir_out" / "private.bin");     // a folder symlinked out
  check_outside(scope, t.root / "ckpt" / "abs_in.txt");         // absolute symlinks are refused even pointing inside
  check_outside(scope, t.outside / "private.bin");              // not under the root at all
  check_outside(scope, t.root / ".." / "outside" / "private.bin");
  check_outside(scope, t.root.parent_path() / "rootx" / "twin.bin");  // shares the root's string prefix
  BOOST_CHECK_THROW(scope.stat(t.root / "dir_out" / "private.bin"), weight_error);
  BOOST_CHECK_THROW(scope.list(t.root / "dir_out"), weight_error);
  auto [failed, e] = open_error(scope, t.root / "ckpt" / "abs_out.bin");
  const std::string what = e.what();
  BOOST_TEST(what.find("resolves outside the allowed model root " + t.root.string()) != std::string::npos, what);
  BOOST_TEST(what.find("TOPSECRE") == std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_folder_swapped_for_a_symlink_after_admission_is_refused) {
  tree t;
  const file_scope scope({t.root});
  const fs::path admitted = scope.admit(t.root / "ckpt");  // checked while it is a real folder
  BOOST_TEST(admitted == t.root / "ckpt");
  fs::rename(t.root / "ckpt", t.root / "ckpt.old");
  fs::create_directory_symlink(t.outside, t.root / "ckpt");  // then swapped: the open itself must refuse
  write(t.outside / "weights.bin", "outside");
  check_outside(scope, admitted / "weights.bin");
}

BOOST_AUTO_TEST_CASE(admit_resolves_the_named_path_and_refuses_one_outside_every_root) {
  tree t;
  const file_scope scope({t.root, t.outside / ".." / "rootx"});
  BOOST_TEST(scope.roots().size() == 2u);
  fs::create_directory_symlink(t.root / "other", t.root / "latest");  // absolute link as a path's last part: resolved
  BOOST_TEST(scope.admit(t.root / "latest") == t.root / "other");
  BOOST_TEST(scope.admit(t.root / "ckpt" / ".." / "other" / "") == t.root / "other");
  BOOST_TEST(scope.admit(t.root / "not-yet") == t.root / "not-yet");
  try {
    scope.admit(t.root / "dir_out");
    BOOST_ERROR("admitted a link out of the root");
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::outside_root);
    BOOST_TEST(std::string(e.what()).find("resolves to '" + t.outside.string() + "', which is outside the allowed model roots") !=
                   std::string::npos,
               e.what());
  }
  const file_scope anywhere;
  BOOST_TEST(!anywhere.restricted());
  BOOST_TEST(read_fd(anywhere.open(t.root / "ckpt" / "abs_out.bin", O_RDONLY).get()) == "TOPSECRETDATA");
  BOOST_CHECK_THROW(file_scope({t.root / "missing"}), weight_error);
}

BOOST_AUTO_TEST_CASE(a_safetensors_shard_symlinked_out_is_refused_and_a_reopen_stays_beneath) {
  tree t;
  const file_scope scope({t.root});
  {
    safetensors_writer w(t.root / "ckpt" / "model.safetensors", {{"w", dtype::F32, {2}}});
    const float v[2] = {1, 2};
    w.write("w", std::as_bytes(std::span(v)));
    w.finish();
  }
  auto f = safetensors_file::open(t.root / "ckpt" / "model.safetensors", scope);
  BOOST_TEST(f.header().tensors.size() == 1u);
  auto again = f.reopen(O_RDONLY);
  BOOST_TEST_REQUIRE(static_cast<bool>(again));
  BOOST_TEST(f.same_file(again.get()));
  // The path now leads out of the root: the reopen gives nothing (the file opened first is still read).
  fs::remove(t.root / "ckpt" / "model.safetensors");
  fs::create_symlink(t.outside / "private.bin", t.root / "ckpt" / "model.safetensors");
  BOOST_TEST(!f.reopen(O_RDONLY));
  try {
    safetensors_file::open(t.root / "ckpt" / "model.safetensors", scope);
    BOOST_ERROR("opened a shard outside the root");
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::outside_root, e.what());
  }
}

BOOST_AUTO_TEST_CASE(a_checkpoint_with_a_component_folder_symlinked_out_is_refused_naming_it) {
  tree t;
  auto make_ckpt = [&](const fs::path& dir) {
    write(dir / "model_index.json", R"({"_class_name": "X", "transformer": ["diffusers", "T"]})");
    write(dir / "transformer" / "config.json", "{}");
    safetensors_writer w(dir / "transformer" / "diffusion_pytorch_model.safetensors", {{"w", dtype::F32, {1}}});
    const float v = 1;
    w.write("w", std::as_bytes(std::span(&v, 1)));
    w.finish();
  };
  make_ckpt(t.root / "good");
  make_ckpt(t.outside / "evil");
  const file_scope scope({t.root});
  const auto layout = read_model_layout(t.root / "good", scope);
  BOOST_TEST(layout.find("transformer")->weight_files.size() == 1u);
  BOOST_TEST(open_module_dir("transformer", t.root / "good" / "transformer", scope).tensors.size() == 1u);

  fs::create_directories(t.root / "bad");
  fs::copy(t.root / "good" / "model_index.json", t.root / "bad" / "model_index.json");
  fs::create_directory_symlink(t.outside / "evil" / "transformer", t.root / "bad" / "transformer");
  try {
    read_model_layout(t.root / "bad", scope);
    BOOST_ERROR("read a layout whose component lies outside the root");
  } catch (const weight_error& e) {
    BOOST_TEST(e.code() == weight_errc::outside_root);
    BOOST_TEST(std::string(e.what()).find((t.root / "bad" / "transformer").string()) == 0, e.what());
  }
  BOOST_CHECK_THROW(open_module_dir("transformer", t.root / "bad" / "transformer", scope), weight_error);
  // The operator's own model (no scope) may use such a layout.
  BOOST_TEST(read_model_layout(t.root / "bad").find("transformer")->weight_files.size() == 1u);
}

BOOST_AUTO_TEST_CASE(a_file_that_is_not_safetensors_is_never_quoted) {
  const std::string secret = "TOPSECRETDATA, the rest of a private file";
  const std::string number = "4995128901736877908";  // "TOPSECRE" as a little-endian u64
  auto message_of = [](const std::string& bytes) {
    try {
      parse_header("f.safetensors", std::as_bytes(std::span(bytes.data(), bytes.size())), bytes.size());
    } catch (const weight_error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  const std::string too_large = message_of(secret);
  BOOST_TEST(too_large.find("not a safetensors file: its header length field is implausible") != std::string::npos, too_large);
  BOOST_TEST(too_large.find("(above the limit of 100000000 bytes; " + std::to_string(secret.size()) + " byte file)") != std::string::npos,
             too_large);
  // A length that fits the bound but not the file, and a header that is not JSON: neither is quoted.
  std::string past(8, '\0');
  past[0] = 'T', past[1] = 'O', past[2] = 'P';
  past += "SECRET";
  const std::string past_message = message_of(past);
  BOOST_TEST(past_message.find("runs past the end of the file (14 byte file)") != std::string::npos, past_message);
  std::string bad_json(8, '\0');
  const std::string header = "{\"TOPSECRETDATA\" oops}";
  bad_json[0] = static_cast<char>(header.size());
  bad_json += header;
  const std::string json_message = message_of(bad_json);
  BOOST_TEST(json_message.find("header is not valid JSON (syntax error at header byte") != std::string::npos, json_message);
  for (const auto& m : {too_large, past_message, json_message}) {
    BOOST_TEST(m.find("TOPSECRE") == std::string::npos, m);
    BOOST_TEST(m.find("TOP") == std::string::npos, m);
    BOOST_TEST(m.find(number) == std::string::npos, m);
  }
}

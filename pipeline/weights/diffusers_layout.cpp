#include "pipeline/weights/diffusers_layout.hpp"

#include <algorithm>
#include <set>

#include <nlohmann/json.hpp>

namespace refit::weights {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

[[noreturn]] void fail(weight_errc code, const fs::path& where, const std::string& what) {
  throw weight_error(code, where.string() + ": " + what);
}

json read_json_file(const fs::path& path, weight_errc code, const file_scope& scope) {
  std::string text;
  try {
    text = scope.read_small_file(path);
  } catch (const weight_error& e) {
    if (e.code() == weight_errc::outside_root) throw;
    fail(code, path, "cannot be read");
  }
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) fail(code, path, "is not valid JSON");
  if (!doc.is_object()) fail(code, path, "must hold a JSON object");
  return doc;
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A shard name from an index must name a file directly inside the component folder.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

void locate_weights(component_info& c, const file_scope& scope) {
  std::vector<fs::path> indexes, files;
  for (const auto& name : scope.list(c.dir)) {
    if (name.starts_with(".")) continue;  // temporary files of writers
    const bool index = ends_with(name, ".safetensors.index.json"), weights = !index && ends_with(name, ".safetensors");
    if (!index && !weights) continue;
    // Resolved beneath the root: a weight file that is a symlink out of it is an error, not skipped.
    if (!scope.is_regular_file(c.dir / name)) continue;
    (index ? indexes : files).push_back(c.dir / name);
  }
  std::sort(indexes.begin(), indexes.end());
  std::sort(files.begin(), files.end());

  if (indexes.size() > 1) {
    // Diffusers variants (NAME.fp16.safetensors.index.json) sit beside the default index.
    std::vector<fs::path> plain;
    for (auto& i : indexes) {
      auto stem = i.filename().string();
      stem = stem.substr(0, stem.size() - std::string_view(".safetensors.index.json").size());
      if (stem.find('.') == std::string::npos) plain.push_back(i);
    }
    if (plain.size() != 1) fail(weight_errc::bad_shard_index, c.dir, "more than one *.safetensors.index.json; cannot tell which to load");
    indexes = plain;
  }
  if (indexes.size() == 1) {
    c.index_file = indexes.front();
    json idx = read_json_file(*c.index_file, weight_errc::bad_shard_index, scope);
    auto wm = idx.find("weight_map");
    if (wm == idx.end() || !wm->is_object() || wm->empty())
      fail(weight_errc::bad_shard_index, *c.index_file, "has no 'weight_map' object");
    std::set<std::string> shards;
    for (auto& [tensor, shard] : wm->items()) {
      if (!shard.is_string() || !is_plain_file_name(shard.get<std::string>()))
        fail(weight_errc::bad_shard_index, *c.index_file,
             "weight_map entry for '" + tensor + "' must name a file in the same folder");
      shards.insert(shard.get<std::string>());
    }
    for (const auto& s : shards) {
      fs::path p = c.dir / s;
      if (!scope.is_regular_file(p)) fail(weight_errc::missing_shard, *c.index_file, "lists shard '" + s + "' which does not exist");
      c.weight_files.push_back(p);
    }
  } else if (files.size() == 1) {
    c.weight_files = files;
  } else if (files.size() > 1) {
    std::vector<fs::path> plain;
    for (auto& f : files) {
      auto stem = f.filename().string();
      stem = stem.substr(0, stem.size() - std::string_view(".safetensors").size());
      if (stem.find('.') == std::string::npos) plain.push_back(f);
    }
    if (plain.size() != 1) {
      std::string names;
      for (auto& f : files) names += (names.empty() ? "" : ", ") + f.filename().string();
      fail(weight_errc::bad_shard_index, c.dir, "holds several safetensors files (" + names + ") but no index naming the shards");
    }
    c.weight_files = plain;
  }
  c.weight_bearing = !c.weight_files.empty();
}

}  // namespace

const component_info* model_layout::find(std::string_view name) const {
  for (const auto& c : components)
    if (c.name == name) return &c;
  return nullptr;
}

std::vector<std::string> model_layout::weight_bearing_names() const {
  std::vector<std::string> out;
  for (const auto& c : components)
    if (c.weight_bearing) out.push_back(c.name);
  return out;
}

model_layout read_model_layout(const fs::path& root_in, const file_scope& scope) {
  model_layout m;
  std::error_code ec;
  m.root = fs::weakly_canonical(root_in, ec);
  if (ec) m.root = root_in;
  if (!scope.is_directory(m.root)) fail(weight_errc::bad_model_index, root_in, "is not a directory");
  const fs::path index = m.root / "model_index.json";
  if (!scope.is_regular_file(index)) fail(weight_errc::bad_model_index, m.root, "has no model_index.json");
  json doc = read_json_file(index, weight_errc::bad_model_index, scope);
  if (auto cls = doc.find("_class_name"); cls != doc.end() && cls->is_string()) m.pipeline_class = cls->get<std::string>();

  for (auto& [key, value] : doc.items()) {
    if (key.starts_with("_")) continue;        // _class_name, _diffusers_version, _name_or_path
    if (!value.is_array()) continue;           // pipeline options such as "is_distilled": true
    if (value.size() != 2)
      fail(weight_errc::bad_model_index, index, "component '" + key + "' must be [library, class]");
    if (value[0].is_null() && value[1].is_null()) continue;  // optional component left out
    if (!value[0].is_string() || !value[1].is_string())
      fail(weight_errc::bad_model_index, index, "component '" + key + "' must be [library, class] strings");
    if (!is_plain_file_name(key)) fail(weight_errc::bad_model_index, index, "component name '" + key + "' is not a folder name");
    component_info c;
    c.name = key;
    c.library = value[0].get<std::string>();
    c.class_name = value[1].get<std::string>();
    c.dir = m.root / key;
    if (!scope.is_directory(c.dir))
      fail(weight_errc::missing_component, index, "lists component '" + key + "' but folder " + c.dir.string() + " is missing");
    locate_weights(c, scope);
    m.components.push_back(std::move(c));
  }
  std::sort(m.components.begin(), m.components.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return m;
}

module_weights open_module_weights(const component_info& c, const file_scope& scope) {
  module_weights w;
  w.module = c.name;
  w.dir = c.dir;
  if (c.weight_files.empty()) fail(weight_errc::no_weights, c.dir, "component '" + c.name + "' has no safetensors weights");
  for (const auto& f : c.weight_files) w.shards.push_back(safetensors_file::open(f, scope));

  std::map<std::string, std::string> index_map;  // tensor -> shard file name, when sharded
  if (c.index_file) {
    json idx = read_json_file(*c.index_file, weight_errc::bad_shard_index, scope);
    for (auto& [tensor, shard] : idx["weight_map"].items()) index_map.emplace(tensor, shard.get<std::string>());
  }
  for (size_t s = 0; s < w.shards.size(); ++s) {
    const auto& shard = w.shards[s];
    const std::string shard_name = shard.path().filename().string();
    for (const auto& t : shard.header().tensors) {
      auto [it, inserted] = w.tensors.emplace(t.name, tensor_location{s, &t});
      if (!inserted)
        fail(weight_errc::tensor_in_two_shards, c.dir,
             "tensor '" + t.name + "' is stored in both " + w.shards[it->second.shard].path().filename().string() +
                 " and " + shard_name);
      if (c.index_file) {
        auto m = index_map.find(t.name);
        if (m == index_map.end())
          fail(weight_errc::shard_mismatch, *c.index_file,
               "tensor '" + t.name + "' is in shard " + shard_name + " but missing from weight_map");
        if (m->second != shard_name)
          fail(weight_errc::shard_mismatch, *c.index_file,
               "weight_map puts tensor '" + t.name + "' in " + m->second + " but it is stored in " + shard_name);
      }
      w.total_bytes += t.nbytes();
    }
  }
  for (const auto& [tensor, shard] : index_map)
    if (!w.tensors.count(tensor))
      fail(weight_errc::shard_mismatch, *c.index_file,
           "weight_map lists tensor '" + tensor + "' in " + shard + " but that shard does not hold it");
  return w;
}

module_weights open_module_dir(const std::string& module, const fs::path& dir, const file_scope& scope) {
  component_info c;
  c.name = module;
  c.dir = dir;
  if (!scope.is_directory(dir)) fail(weight_errc::missing_component, dir, "is not a directory");
  locate_weights(c, scope);
  return open_module_weights(c, scope);
}

}  // namespace refit::weights

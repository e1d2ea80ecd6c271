// The model families refit serves, keyed by model_index.json's _class_name. Adding a family: implement
// diffusion_pipeline under pipeline/ and add one line to `families` (docs/architecture.md).
#include "pipeline/pipeline.hpp"

#include <functional>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::pipeline {

namespace {

using factory = std::function<std::unique_ptr<diffusion_pipeline>(const std::filesystem::path&, const models::placement&,
                                                                  const offload_settings&)>;

template <class Family>
std::unique_ptr<diffusion_pipeline> make(const std::filesystem::path& dir, const models::placement& where, const offload_settings& o) {
  return std::make_unique<Family>(dir, where, o);
}

struct family {
  std::string_view class_name;
  factory build;
};

const family families[] = {
    {flux2_klein_pipeline::pipeline_class, make<flux2_klein_pipeline>},
};

}  // namespace

std::vector<std::string> supported_pipeline_classes() {
  std::vector<std::string> out;
  for (const auto& f : families) out.emplace_back(f.class_name);
  return out;
}

std::unique_ptr<diffusion_pipeline> open_pipeline(const std::filesystem::path& model_dir, const models::placement& where,
                                                  const offload_settings& offload) {
  const weights::model_layout layout = weights::read_model_layout(model_dir);
  for (const auto& f : families)
    if (f.class_name == layout.pipeline_class) return f.build(layout.root, where, offload);
  std::string supported;
  for (const auto& c : supported_pipeline_classes()) supported += (supported.empty() ? "" : ", ") + c;
  const std::string what = layout.pipeline_class.empty() ? "has no _class_name" : "names _class_name '" + layout.pipeline_class + "'";
  throw std::runtime_error((layout.root / "model_index.json").string() + " " + what + ", which refit does not serve (supported: " +
                           supported + ")");
}

}  // namespace refit::pipeline

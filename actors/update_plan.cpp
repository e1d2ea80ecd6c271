#include "actors/update_plan.hpp"

#include <algorithm>
#include <set>

#include "messages/input_limits.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/weights/beneath.hpp"
#include "pipeline/weights/beneath.hpp"

namespace refit::actors {

namespace {

weights::file_scope scope_of(const std::vector<std::string> &roots) {
  if (roots.empty())
    return {};
  return weights::file_scope(
      std::vector<std::filesystem::path>(roots.begin(), roots.end()));
}

update_plan plan_checkpoint(const msg::update_request &req,
                            const std::set<std::string> &targets,
                            const std::vector<std::string> &roots) {
  update_plan out;
  weights::file_scope scope;
  std::filesystem::path admitted;
  try {
    scope = scope_of(roots);
    admitted = scope.admit(req.model_path);
  } catch (const std::exception &e) {
    out.error = std::string("model_path ") + e.what();
    return out;
  }
  // SGLang's rule: module M's weights are the folder model_path/M (config.json
  // and safetensors, checked when the module opens them). model_index.json is
  // not needed, and modules that are not updated need not be there: a trainer
  // may save only the module it trained.
  try {
    if (!scope.is_directory(admitted)) {
      out.error = "Cannot use model_path: " + admitted.string() +
                  " is not a directory";
      return out;
    }
    std::string missing;
    for (const auto &t : targets) {
      const auto dir = admitted / t;
      if (!scope.is_directory(dir))
        missing += (missing.empty() ? "'" : ", '") + t + "'";
      else
        out.sources[t] = {msg::source_kind::checkpoint, dir.string(), 0, {}, roots, false, -1, {}};
    }
    if (!missing.empty()) {
      out.sources.clear();
      out.error = "Cannot update weights: missing weight files for modules: [" +
                  missing + "]. No partial updates allowed.";
    }
  } catch (const std::exception &e) {
    out.sources.clear();
    out.error = std::string("Cannot use model_path: ") + e.what();
  }
  return out;
}

// Names are the module's own with one target module (SGLang's convention: a
// trainer updates one module per request), and "module.name" with several.
update_plan plan_distributed(const msg::update_request &req,
                             const std::vector<std::string> &targets,
                             uint64_t update) {
  update_plan out;
  if (req.group_name.empty()) {
    out.error = "group_name must not be empty";
    return out;
  }
  if (req.tensors.empty()) {
    out.error = "names must list at least one tensor";
    return out;
  }
  out.receive.update = update;
  out.receive.group_name = req.group_name;
  out.receive.flattened_bucket = req.flattened_bucket;
  std::set<std::string> fed;
  for (const auto &t : req.tensors) {
    msg::routed_tensor r{"", t.name, t.name, t.dtype, t.shape};
    if (targets.size() == 1) {
      r.module = targets.front();
    } else {
      for (const auto &m : targets)
        if (t.name.size() > m.size() + 1 &&
            t.name.compare(0, m.size() + 1, m + ".") == 0 &&
            m.size() > r.module.size())
          r.module = m;
      if (r.module.empty()) {
        std::string names;
        for (const auto &m : targets)
          names += (names.empty() ? "'" : ", '") + m + "'";
        out.error = "Tensor '" + t.name +
                    "' names none of the target modules " + names +
                    ": with several target_modules, each name starts with its "
                    "module and a dot";
        return out;
      }
      r.name = t.name.substr(r.module.size() + 1);
    }
    fed.insert(r.module);
    out.receive.tensors.push_back(std::move(r));
  }
  for (const auto &m : targets) {
    if (!fed.count(m)) {
      out.error = "No tensor is announced for target module '" + m + "'";
      return out;
    }
    out.sources[m] = {msg::source_kind::distributed,
                      "distributed group '" + req.group_name + "'", update, {}, {}, false, -1, {}};
    if (req.lora_merge) {
      // The tensors are an adapter's A/B weights: the modules merge them (SGLang's "lora_merge").
      out.sources[m].kind = msg::source_kind::lora;
      out.sources[m].adapters = {{received_adapter(req, m), "", 1.0,
                                  req.lora_alpha, true, req.lora_rank}};
    }
  }
  out.receive.lora = req.lora_merge;
  if (req.lora_merge) {
    // An adapter's names as PEFT or Diffusers save them ("base_model.model.x.lora_A.weight",
    // "<module>.x.lora_A.weight"): per module, the prefix they all share goes.
    for (const auto &m : targets) {
      std::vector<std::string> names;
      for (const auto &r : out.receive.tensors)
        if (r.module == m)
          names.push_back(r.name);
      const size_t n = lora::shared_prefix(names, m).size();
      for (auto &r : out.receive.tensors)
        if (r.module == m)
          r.name = r.name.substr(n);
    }
  }
  return out;
}

// A colocated trainer's tensors: each worker opens its payload first. A tensor without a module belongs to
// the single target module; every target needs tensors in every payload.
update_plan plan_tensor(const msg::update_request &req,
                        const std::vector<std::string> &targets,
                        uint64_t update) {
  update_plan out;
  if (req.payloads.empty()) {
    out.error = "serialized_named_tensors is required";
    return out;
  }
  out.receive.update = update;
  out.receive.lora = req.lora_merge;
  out.receive.shared = req.payloads;
  for (auto &p : out.receive.shared) {
    std::set<std::string> provided;
    for (auto &t : p.tensors) {
      if (t.module.empty()) {
        if (targets.size() != 1) {
          out.error = "Ambiguous tensor payload for multi-module update. Send a dict {module: payload}";
          return out;
        }
        t.module = targets.front();
      }
      if (std::find(targets.begin(), targets.end(), t.module) == targets.end()) {
        out.error = "The payload carries tensors for module '" + t.module +
                    "', which target_modules does not name";
        return out;
      }
      provided.insert(t.module);
    }
    std::string missing, have;
    for (const auto &m : targets)
      if (!provided.count(m))
        missing += (missing.empty() ? "'" : ", '") + m + "'";
    for (const auto &m : provided)
      have += (have.empty() ? "'" : ", '") + m + "'";
    if (!missing.empty()) {
      out.error = "Missing tensor payload for module(s): [" + missing +
                  "]. Provided modules: [" + have + "]";
      return out;
    }
  }
  if (req.lora_merge)
    for (const auto &m : targets) {
      std::vector<std::string> names;
      for (const auto &p : out.receive.shared)
        for (const auto &t : p.tensors)
          if (t.module == m)
            names.push_back(t.name);
      const size_t n = lora::shared_prefix(names, m).size();
      for (auto &p : out.receive.shared)
        for (auto &t : p.tensors)
          if (t.module == m)
            t.name = t.name.substr(n);
    }
  for (const auto &m : targets) {
    out.sources[m] = {msg::source_kind::distributed, source_label(req), update,
                      {}, {}, false, -1, {}};
    if (req.lora_merge) {
      out.sources[m].kind = msg::source_kind::lora;
      out.sources[m].adapters = {{received_adapter(req, m), "", 1.0,
                                  req.lora_alpha, true, req.lora_rank}};
    }
  }
  return out;
}

update_plan plan_lora(const msg::update_request &req,
                      const std::set<std::string> &targets, uint64_t update,
                      const std::vector<std::string> &roots) {
  update_plan out;
  std::vector<msg::lora_entry> adapters = req.adapters;
  try {
    const weights::file_scope scope = scope_of(roots);
    for (auto &e : adapters)
      if (!e.path.empty())
        e.path = scope.admit(e.path).string();
  } catch (const std::exception &e) {
    out.error = std::string("lora_path ") + e.what();
    return out;
  }
  for (const auto &t : targets)
    out.sources[t] = {msg::source_kind::lora, source_label(req), update, adapters, roots, false, -1, {}};
  return out;
}

// What no kind of source may carry: a label refit repeats back that is too long or holds control
// characters, a path with a NUL byte (the system calls would read only the part before it).
std::string refused_input(const msg::update_request &req) {
  if (auto why = msg::label_problem("weight_version", req.weight_version);
      !why.empty())
    return why;
  if (req.model_path.find('\0') != std::string::npos)
    return "field 'model_path' must not contain a NUL byte";
  for (const auto &a : req.adapters) {
    if (a.path.find('\0') != std::string::npos)
      return "field 'lora_path' must not contain a NUL byte";
    if (auto why = msg::label_problem("lora_nickname", a.nickname,
                                      msg::max_nickname_bytes);
        !why.empty())
      return why;
  }
  return {};
}

update_plan plan_sources(const msg::update_request &req,
                         const std::vector<std::string> &modules,
                         const std::string &denoiser, uint64_t update,
                         const std::vector<std::string> &roots);

} // namespace

std::string received_adapter(const msg::update_request &req,
                             const std::string &module) {
  return req.source == msg::source_kind::tensor ? "tensor:" + module
                                                 : "distributed:" + req.group_name;
}

std::string source_label(const msg::update_request &req) {
  switch (req.source) {
  case msg::source_kind::distributed:
    return "distributed group '" + req.group_name + "'";
  case msg::source_kind::tensor:
    return "tensors shared by the trainer";
  case msg::source_kind::lora: {
    if (req.adapters.empty())
      return "LoRA unmerge";
    std::string names;
    for (const auto &a : req.adapters)
      names += (names.empty() ? "" : ", ") + a.nickname;
    return "LoRA " + names;
  }
  case msg::source_kind::checkpoint:
    break;
  }
  return req.model_path;
}

update_plan plan_update(const msg::update_request &req,
                        const std::vector<std::string> &modules,
                        const std::string &denoiser, uint64_t update,
                        const std::vector<std::string> &roots) {
  update_plan out;
  out.error = refused_input(req);
  if (!out.error.empty())
    return out;
  out = plan_sources(req, modules, denoiser, update, roots);
  for (auto &[module, source] : out.sources)
    source.check_finite = req.check_finite == msg::finite_check::on;
  return out;
}

namespace {

update_plan plan_sources(const msg::update_request &req,
                         const std::vector<std::string> &modules,
                         const std::string &denoiser, uint64_t update,
                         const std::vector<std::string> &roots) {
  update_plan out;
  // A trainer's update targets the denoiser unless it says otherwise (a
  // shared-tensor payload by its modules); a checkpoint every module.
  std::vector<std::string> trained{denoiser};
  if (req.source == msg::source_kind::tensor) {
    std::set<std::string> named;
    for (const auto &p : req.payloads)
      for (const auto &t : p.tensors)
        if (!t.module.empty())
          named.insert(t.module);
    if (!named.empty()) {
      trained.clear();
      for (const auto &n : named)
        trained.push_back(n);
    }
  }
  const std::vector<std::string> &targets =
      !req.target_modules.empty()                   ? req.target_modules
      : req.source == msg::source_kind::checkpoint ? modules
                                                    : trained;
  if (req.source == msg::source_kind::checkpoint && req.model_path.empty()) {
    out.error = "model_path is required";
    return out;
  }
  for (const auto &t : targets)
    if (std::find(modules.begin(), modules.end(), t) == modules.end()) {
      std::string names;
      for (const auto &m : modules)
        names += (names.empty() ? "" : ", ") + m;
      out.error =
          "Module '" + t + "' not found in pipeline (modules: " + names + ")";
      return out;
    }
  const std::set<std::string> unique(targets.begin(), targets.end());
  switch (req.source) {
  case msg::source_kind::checkpoint:
    return plan_checkpoint(req, unique, roots);
  case msg::source_kind::distributed:
    return plan_distributed(req, {unique.begin(), unique.end()}, update);
  case msg::source_kind::lora:
    return plan_lora(req, unique, update, roots);
  case msg::source_kind::tensor:
    return plan_tensor(req, {unique.begin(), unique.end()}, update);
  }
  out.error = "unknown weight source kind " + msg::to_string(req.source);
  return out;
}

} // namespace

} // namespace refit::actors

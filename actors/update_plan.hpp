// The plan phase: from the request alone, which modules take part and where
// each one's new weights come from (a checkpoint: its layout resolved, each
// target module's folder; a distributed update: each announced tensor routed to
// its target module, and what every worker must receive first). Sources are
// strategies: each kind of request plans here, and the rest of the transaction
// only passes weight_source values on.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

struct update_plan {
  std::map<std::string, msg::weight_source> sources; // per target module
  msg::receive_request
      receive;       // distributed: what every worker receives before validate
  std::string error; // why the request cannot be planned; nothing was touched
};

// `update`: the transaction's number, which names what workers receive for it.
// A trainer's update (distributed) without target_modules targets `denoiser`,
// the pipeline's denoising network, as SGLang's diffusion engine does; a checkpoint update
// without them targets every module.
// The nickname of the adapter a trainer sends as tensors (weight_update_mode "lora_merge"): "distributed:<group>"
// or "tensor:<module>".
std::string received_adapter(const msg::update_request &request,
                             const std::string &module);

// `allowed_roots` (canonical; empty: anywhere): a checkpoint's model_path and the LoRA adapter paths must
// resolve into one of them, and every source carries them so that the module actors open each file
// beneath them. The request's labels (weight_version, adapter nicknames) are checked here too, so a
// request through the actor port is held to the HTTP API's bounds.
update_plan plan_update(const msg::update_request &request,
                        const std::vector<std::string> &pipeline_modules,
                        const std::string &denoiser, uint64_t update,
                        const std::vector<std::string> &allowed_roots = {});

// Where an update's weights come from, for messages and logs: the checkpoint
// folder, or "distributed group 'G'".
std::string source_label(const msg::update_request &request);

} // namespace refit::actors

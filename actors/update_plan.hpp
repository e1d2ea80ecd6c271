// The plan phase: from the request alone, which modules take part and where each one's new weights
// come from (a checkpoint: its layout resolved, each target module's folder). Sources are strategies:
// each kind of request plans here, and the rest of the transaction only passes weight_source values on.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "messages/protocol.hpp"

namespace refit::actors {

struct update_plan {
  std::map<std::string, msg::weight_source> sources;  // per target module
  std::string error;                                  // why the request cannot be planned; nothing was touched
};

update_plan plan_update(const msg::update_request& request, const std::vector<std::string>& pipeline_modules);

}  // namespace refit::actors

// The module source behind a weight_source message: the one place where the protocol's source kinds
// meet their implementations under pipeline/.
#pragma once

#include <memory>

#include "messages/types.hpp"

namespace refit::update {
class module_source;
}

namespace refit::actors {

struct module_state;

// For the module of `state`: distributed sources read the worker's received tensors, LoRA merges the
// server's adapters (loading them on first use) and the module's current sources (for kept base values).
// Throws std::invalid_argument for a kind this build does not know, a distributed update whose tensors
// the worker does not hold, or an adapter it cannot read.
std::shared_ptr<update::module_source> open_source(const msg::weight_source& source, module_state& state);

}  // namespace refit::actors

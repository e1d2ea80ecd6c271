// The module source behind a weight_source message: the one place where the protocol's source kinds
// meet their implementations under pipeline/.
#pragma once

#include <memory>

#include "messages/types.hpp"

namespace refit::update {
class module_source;
}
namespace refit::transfer {
class received_table;
}

namespace refit::actors {

// `received`: the module's worker's received tensors (distributed sources). Throws std::invalid_argument
// for a kind this build does not know, or a distributed update whose tensors the worker does not hold.
std::shared_ptr<update::module_source> open_source(const msg::weight_source& source, const transfer::received_table* received);

}  // namespace refit::actors

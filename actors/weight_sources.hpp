// The module source behind a weight_source message: the one place where the protocol's source kinds
// meet their implementations under pipeline/update/.
#pragma once

#include <memory>

#include "messages/types.hpp"

namespace refit::update {
class module_source;
}

namespace refit::actors {

// Throws std::invalid_argument for a kind this build does not know.
std::shared_ptr<update::module_source> open_source(const msg::weight_source& source);

}  // namespace refit::actors

#include "actors/weight_sources.hpp"

#include <stdexcept>

#include "pipeline/update/checkpoint_source.hpp"

namespace refit::actors {

std::shared_ptr<update::module_source> open_source(const msg::weight_source& source) {
  switch (source.kind) {
    case msg::source_kind::checkpoint: return std::make_shared<update::checkpoint_source>(source.location);
  }
  throw std::invalid_argument("unknown weight source kind " + msg::to_string(source.kind));
}

}  // namespace refit::actors

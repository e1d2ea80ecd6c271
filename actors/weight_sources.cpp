#include "actors/weight_sources.hpp"

#include <stdexcept>

#include "pipeline/transfer/received_weights.hpp"
#include "pipeline/update/checkpoint_source.hpp"

namespace refit::actors {

std::shared_ptr<update::module_source> open_source(const msg::weight_source& source, const transfer::received_table* received) {
  switch (source.kind) {
    case msg::source_kind::checkpoint: return std::make_shared<update::checkpoint_source>(source.location);
    case msg::source_kind::distributed: {
      auto set = received ? received->find(source.update) : nullptr;
      if (!set)
        throw std::invalid_argument("this worker holds nothing received for update " + std::to_string(source.update) + " from " +
                                    source.location);
      return std::make_shared<transfer::received_source>(std::move(set));
    }
  }
  throw std::invalid_argument("unknown weight source kind " + msg::to_string(source.kind));
}

}  // namespace refit::actors

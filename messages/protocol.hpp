// refit's protocol in one place: atoms (atoms.hpp), errors (errors.hpp), message structs (types.hpp),
// the client API that clients and the actor port see (client_api.hpp) and the internal control
// interfaces (control.hpp). Messages carry commands and small metadata (paths, names, checksums,
// encoded images), never bulk tensor bytes.
#pragma once

#include <caf/actor_system_config.hpp>

#include "messages/atoms.hpp"
#include "messages/client_api.hpp"
#include "messages/cluster.hpp"
#include "messages/control.hpp"
#include "messages/errors.hpp"
#include "messages/types.hpp"

namespace refit::msg {

// The category of refit's caf::error values.
inline constexpr caf::atom_value error_category = caf::atom("refit");

// Registers every message type and the error category on a CAF config (client and server alike: the
// names must match on both ends of a remote connection).
void add_types(caf::actor_system_config& cfg);

}  // namespace refit::msg

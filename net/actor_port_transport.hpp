// The actor port's connections: a CAF middleman actor whose TCP (or TLS) connections refuse a BASP frame
// that announces more payload than allowed, before CAF allocates a byte for it.
//
// CAF 0.17's BASP broker reads a 32-byte header and then sizes the connection's read buffer to the
// payload length the header claims (up to 4 GiB, zero-filled, held while the connection stays open);
// CAF has no setting that bounds it. The broker asks the connection (an io::scribe) for that read size,
// so the bound lives there: a request over the per-message limit, or over what all connections together
// may hold, closes the connection the way a failed read does, and the BASP broker cleans up after it.
//
// With TLS, each accepted connection first completes CAF's OpenSSL handshake (caf::openssl::session,
// configured from actor_system_config's openssl_* fields: peer certificate required and verified
// against the CA); until then no byte reaches BASP.
#pragma once

#include <caf/fwd.hpp>
#include <caf/io/middleman_actor.hpp>

#include <cstddef>

namespace refit::net {

struct actor_port_limits {
  size_t max_message_bytes = size_t{16} << 20;   // one BASP payload
  size_t max_buffered_bytes = size_t{256} << 20;  // every connection's read buffer together
};

// A middleman actor (publish, connect, unpublish like caf::io::middleman_actor) on the system's BASP
// broker whose connections enforce `limits`; TLS when the system loaded caf::openssl::manager with
// credentials. Stop it with an exit message before the actor system goes.
caf::io::middleman_actor spawn_bounded_middleman(caf::actor_system& sys, const actor_port_limits& limits);

}  // namespace refit::net

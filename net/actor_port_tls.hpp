// The actor port's mutual-TLS credentials: this process's certificate chain and key, and the cluster CA
// that every peer's certificate must be signed by (CAF's OpenSSL module requires and verifies it on
// both ends). PEM files; all three or none.
#pragma once

#include <string>

namespace refit::net {

struct actor_port_tls {
  std::string certificate, key, ca;

  bool enabled() const { return !certificate.empty() || !key.empty() || !ca.empty(); }
};

// Loads the files as CAF will (for each connection) and checks that they fit: all three given, the key
// unencrypted and the certificate's, the certificate signed by the CA. Throws std::invalid_argument
// naming the option (option_prefix + "cert" / "key" / "ca"), the file and OpenSSL's reason. Warns when
// the key file is readable by group or others.
void check_actor_port_tls(const actor_port_tls& tls, const std::string& option_prefix);

}  // namespace refit::net

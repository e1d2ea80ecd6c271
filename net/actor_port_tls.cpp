#include "net/actor_port_tls.hpp"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <spdlog/spdlog.h>

#include <sys/stat.h>

#include <memory>
#include <stdexcept>

namespace refit::net {

namespace {

std::string openssl_reason() {
  std::string why;
  while (auto code = ERR_get_error()) {
    char text[256];
    ERR_error_string_n(code, text, sizeof text);
    why += (why.empty() ? "" : "; ") + std::string(text);
  }
  return why.empty() ? "no reason given" : why;
}

// Without a callback OpenSSL would prompt on the terminal for an encrypted key.
int refuse_passphrase(char*, int, int, void*) { return 0; }

}  // namespace

void check_actor_port_tls(const actor_port_tls& tls, const std::string& option_prefix) {
  const auto opt = [&](const char* which) { return option_prefix + which; };
  if (tls.certificate.empty() || tls.key.empty() || tls.ca.empty())
    throw std::invalid_argument("mutual TLS on the actor port needs all of " + opt("cert") + ", " + opt("key") + " and " + opt("ca") +
                                " (PEM files: this process's certificate, its private key, the cluster CA)");
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx{SSL_CTX_new(TLS_method()), SSL_CTX_free};
  if (!ctx) throw std::runtime_error("OpenSSL cannot create a TLS context: " + openssl_reason());
  SSL_CTX_set_default_passwd_cb(ctx.get(), refuse_passphrase);
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), tls.certificate.c_str()) != 1)
    throw std::invalid_argument(opt("cert") + " " + tls.certificate + ": not a readable PEM certificate (" + openssl_reason() + ")");
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), tls.key.c_str(), SSL_FILETYPE_PEM) != 1)
    throw std::invalid_argument(opt("key") + " " + tls.key + ": not a readable, unencrypted PEM private key of " + opt("cert") + " " +
                                tls.certificate + " (" + openssl_reason() + ")");
  if (SSL_CTX_check_private_key(ctx.get()) != 1)
    throw std::invalid_argument(opt("key") + " " + tls.key + " is not the key of " + opt("cert") + " " + tls.certificate + " (" +
                                openssl_reason() + ")");
  if (SSL_CTX_load_verify_locations(ctx.get(), tls.ca.c_str(), nullptr) != 1)
    throw std::invalid_argument(opt("ca") + " " + tls.ca + ": not a readable PEM CA certificate (" + openssl_reason() + ")");

  // Peers verify this certificate against the same CA: a mismatch would fail every connection.
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs(ctx.get(), &chain);
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> verify{X509_STORE_CTX_new(), X509_STORE_CTX_free};
  if (!verify || X509_STORE_CTX_init(verify.get(), SSL_CTX_get_cert_store(ctx.get()), SSL_CTX_get0_certificate(ctx.get()), chain) != 1)
    throw std::runtime_error("OpenSSL cannot set up a certificate check: " + openssl_reason());
  if (X509_verify_cert(verify.get()) != 1)
    throw std::invalid_argument(opt("cert") + " " + tls.certificate + " does not verify against " + opt("ca") + " " + tls.ca + ": " +
                                X509_verify_cert_error_string(X509_STORE_CTX_get_error(verify.get())));

  struct stat st{};
  if (::stat(tls.key.c_str(), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
    spdlog::warn("{} {} is accessible to group or others (mode {:o}); chmod 600 it", opt("key"), tls.key, st.st_mode & 0777);
}

}  // namespace refit::net

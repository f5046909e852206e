// SuperNode authentication: an EC key whose public half (PEM) the SuperLink knows, and the signed timestamp
// headers of every Fleet API call (flwr-public-key, flwr-timestamp, flwr-signature).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fedprge {

class NodeKey {
 public:
  // A PEM private key (PKCS#8 or "EC PRIVATE KEY", e.g. ssh-keygen -t ecdsa -b 384 -m PEM); throws naming the path.
  static NodeKey load(const std::string& path);
  // A fresh P-384 key (the node then registers itself, as a SuperNode without --auth-supernode-private-key does).
  static NodeKey generate();

  NodeKey(NodeKey&&) noexcept;
  ~NodeKey();

  const std::string& public_pem() const { return public_pem_; }
  // The authentication headers for a call made now.
  std::vector<std::pair<std::string, std::string>> headers() const;

 private:
  NodeKey() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string public_pem_;
};

std::string base64(const std::string& bytes);
std::string iso_timestamp_utc();  // e.g. 2026-01-02T03:04:05.123456+00:00

}  // namespace fedprge

// Flower's Fleet API over HTTP(S): POST /v1/fleet/<rpc> with protobuf bodies, every call signed with the node's
// key. One Fleet object owns one connection (libcurl handle) and is used by one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

#include <google/protobuf/message.h>

#include "auth.h"
#include "flwr/proto/fleet.pb.h"
#include "flwr/proto/heartbeat.pb.h"
#include "flwr/proto/message.pb.h"

namespace fedprge {

struct Endpoint {
  std::string address;            // host:port of the SuperLink's Fleet API
  bool insecure = false;          // plain HTTP (loopback experiments only)
  std::string root_certificates;  // CA bundle that signs the SuperLink's certificate ("" = system store)
};

// A failed call: `transient` when retrying may help (no connection yet, 502/503/504, a timeout).
class FleetError : public std::runtime_error {
 public:
  FleetError(const std::string& what, bool transient, long status)
      : std::runtime_error(what), transient(transient), status(status) {}
  bool transient;
  long status;  // HTTP status, 0 when no response came
};

class Fleet {
 public:
  Fleet(const Endpoint& endpoint, const NodeKey& key, double call_timeout_s);
  ~Fleet();
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // One RPC: `path` like "activate-node"; parses the answer into `response`. Throws FleetError.
  void call(const std::string& path, const google::protobuf::Message& request, google::protobuf::Message& response);

  const Endpoint& endpoint() const { return endpoint_; }

 private:
  Endpoint endpoint_;
  const NodeKey& key_;
  double timeout_s_;
  void* curl_;
};

// The ends of with_retry that no retry can fix: the SuperLink stayed unreachable for the whole wait, or it refused
// this node (HTTP 401/403/412: an unknown key or node). Any other failure is a std::runtime_error.
class Unreachable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class Refused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs `fn` until it succeeds, retrying transient FleetErrors with exponential backoff (0.5 s doubling to 15 s,
// jittered) for at most `max_wait_s` in all; a permanent error or the deadline ends it with one line naming
// `what` and the SuperLink.
void with_retry(const std::string& what, const Endpoint& endpoint, double max_wait_s, const std::function<void()>& fn,
                const std::function<bool()>& stop = nullptr);

}  // namespace fedprge

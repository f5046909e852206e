// The SuperNode loop of a native client: activate (registering itself without a key), send heartbeats, pull each
// message and its objects, answer it (Handlers) and push the reply; deactivate on SIGINT/SIGTERM.
#pragma once

#include <string>

#include "fleet.h"
#include "handlers.h"

namespace fedprge {

struct NodeOptions {
  Endpoint endpoint;
  std::string key;                // PEM private key registered with `flwr supernode register`; "" = self-register
  double heartbeat_interval = 30;  // seconds the SuperLink waits for the next heartbeat
  double max_wait = 300;          // seconds a call keeps retrying before the client gives up
  double poll = 0.5;              // seconds between polls for a message
};

// Runs until a signal or a setup error; returns the process exit code (0 on a signal, 2 on a setup error).
int run_node(const NodeOptions& options, Handlers& handlers);

}  // namespace fedprge

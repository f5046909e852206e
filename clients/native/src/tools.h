// Offline commands for checking a native client against the Python reference (tests/test_native_client.py).
#pragma once

#include <string>

namespace fedprge {

// The test vectors of clients/vectors.py, computed here, as JSON on stdout.
int print_vectors(const std::string& table_path);

// Round `round` of local training from zero B on the exported data, then every evaluation method of the config,
// as JSON on stdout: the 2q losses and q projected gradients of each step and the final B (float32 bit patterns),
// the train loss, the metrics, and whether the program's own directions equal the host's.
int print_train_check(const std::string& pte, const std::string& data, const std::string& table,
                      const std::string& config_path, long long round, int threads);

// Time `steps` P-RGE steps (the program's forward, g, the update) on the batch and seeds of round 1, step 0, after
// one warm-up step; JSON on stdout: the fastest and the median step in ms and the process's peak RSS in MiB.
int print_step_bench(const std::string& pte, const std::string& data, const std::string& table,
                     const std::string& config_path, int steps, int threads);

// Answer the Flower messages in `messages_path` in order, as a node would (Handlers, with the state file
// `state`), and print the replies' records and the resulting state as JSON. The file is a JSON list of
// {"tree": base64 ObjectTree, "objects": {id: base64 content}}, what a SuperLink would serve for each message.
int print_replies(const std::string& messages_path, const std::string& pte, const std::string& data,
                  const std::string& table, const std::string& state, int threads);

}  // namespace fedprge

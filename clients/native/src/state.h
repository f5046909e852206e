// What a node keeps between messages (client_app.py's context.state): the run's config, the global B and the round
// it reflects, and the personal B of its last training round. Saved atomically after every change, so a killed
// and restarted client resumes: a seed catch-up then skips the rounds it already has.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fedprge {

struct NodeState {
  uint64_t run_id = 0;
  uint64_t node_id = 0;         // the SuperLink's id of this node in its last session (0: none yet)
  std::string config_yaml;      // empty until registration (`query`)
  int64_t synced = 0;           // the round the global B reflects
  std::vector<float> global_b;  // empty: zero B (never synced)
  std::vector<float> personal_b;  // empty: never trained

  // The state in `path`, or a fresh one when the file does not exist; throws naming a damaged file.
  static NodeState load(const std::string& path);
  void save(const std::string& path) const;  // write to path.tmp, fsync, rename
};

}  // namespace fedprge

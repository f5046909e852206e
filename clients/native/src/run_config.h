// The part of a fedprge run config (the YAML of the `query` message) that a native client uses, and the checks
// that refuse what it does not implement or a program that does not match (fedprge.export.backend.check_spec).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "recipe.h"
#include "rng.h"
#include "yaml.h"

namespace fedprge {

struct RunConfig {
  FlatYaml yaml;  // everything, for the data file's consistency check
  uint64_t seed = 0;
  std::string model;
  ZO zo;
  SeedSpec spec;
  int local_steps = 1;
  int batch_size = 1;
  int max_len = 48;
  int rounds = 1;
  int personal_steps = 0;
  std::string downlink;  // weights | seeds | pool
  int lora_rank = 8;
  double lora_alpha = 16.0;
  std::vector<std::string> lora_targets;
  uint64_t lora_a_seed = 0;

  // Parses and checks the YAML; throws one line naming the first setting this client cannot honour.
  static RunConfig from_yaml(const std::string& text);
};

// The sidecar spec of a .pte (python -m fedprge.export writes <stem>.json next to it).
struct ProgramSpec {
  std::string model;
  int64_t num_params = 0, q = 0, batch_size = 0, seq_len = 0, pad_token_id = 0, model_seed = 0, rank = 0;
  uint64_t a_seed = 0;
  double eps = 0, alpha = 0;
  std::string distribution;
  std::vector<std::string> targets;

  static ProgramSpec load(const std::string& pte_path);  // throws naming the missing sidecar
};

// Throws one line naming every setting of `spec` that `cfg` contradicts (as check_spec does).
void check_spec(const RunConfig& cfg, const ProgramSpec& spec, const std::string& pte_path);

}  // namespace fedprge

// Seed derivation and the direction generator of docs/devices.md §4 (fedprge/engine/rng.py, seeds.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fedprge {

uint32_t hash32(uint32_t x);
// derive_seed(parts...): parts are non-negative integers below 2^64.
uint32_t derive_seed(const std::vector<uint64_t>& parts);
// The i-th 32-bit word of seed's stream.
uint32_t bits(uint32_t seed, uint64_t i);

// Seed domains (fedprge/engine/seeds.py): never renumber.
enum Domain : uint64_t { CLIENT_SCOPE = 1, ROUND_SCOPE = 2, POOL_INDEX = 3, POOL_SEED = 4, BATCH = 5, PERSONAL = 6 };

// The 65,536-entry float32 table of z_gaussian, read from the file clients/vectors.py writes.
class GaussianTable {
 public:
  // Throws std::runtime_error naming the path when the file is missing or not the published table.
  explicit GaussianTable(const std::string& path);
  float operator[](uint32_t j) const { return table_[j]; }

 private:
  std::vector<float> table_;
};

// z(seed) of length n for "gaussian" or "rademacher", written to out (resized to n).
void direction(uint32_t seed, size_t n, bool gaussian, const GaussianTable& table, std::vector<float>& out);

struct SeedSpec {
  uint64_t run_seed = 0;
  int q = 4;
  bool client_scope = true;  // federation.seed_scope == "client"
  int pool_size = 0;         // > 0 with downlink=pool
};

// The q seeds of local step `step` of client `partition` in round `rnd` (seeds.step_seeds).
std::vector<uint32_t> step_seeds(const SeedSpec& spec, uint64_t rnd, uint64_t partition, uint64_t step);
// The pool of downlink=pool: derive_seed(run_seed, POOL_SEED, k) for k < pool_size.
std::vector<uint32_t> pool_seeds(const SeedSpec& spec);
// Private directions of a personalization step (seeds.private_seeds).
std::vector<uint32_t> private_seeds(uint64_t run_seed, uint64_t domain, uint64_t tag, uint64_t partition,
                                    uint64_t step, int q);

}  // namespace fedprge

#include "rng.h"

#include <openssl/sha.h>

#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace fedprge {

namespace {
const char* kTableSha256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f";
}

uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

uint32_t derive_seed(const std::vector<uint64_t>& parts) {
  uint32_t h = 0x2545F491u;
  for (uint64_t p : parts) {
    h = hash32(h ^ hash32(static_cast<uint32_t>(p)) ^ hash32(static_cast<uint32_t>((p >> 32) + 0x51ED27u)));
  }
  return h;
}

uint32_t bits(uint32_t seed, uint64_t i) {
  uint32_t k1 = hash32(seed ^ 0x9E3779B9u);
  uint32_t k2 = hash32(k1 + 0x632BE5ABu);
  return hash32(hash32(static_cast<uint32_t>(i) ^ k1) ^ k2);
}

GaussianTable::GaussianTable(const std::string& path) : table_(1 << 16) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    throw std::runtime_error("direction table '" + path +
                             "' does not exist; write it with: python clients/vectors.py --out DIR");
  }
  f.read(reinterpret_cast<char*>(table_.data()), table_.size() * sizeof(float));
  if (f.gcount() != static_cast<std::streamsize>(table_.size() * sizeof(float)) || f.peek() != EOF) {
    throw std::runtime_error("direction table '" + path + "' is not 262144 bytes long");
  }
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(table_.data()), table_.size() * sizeof(float), digest);
  char hex[2 * SHA256_DIGEST_LENGTH + 1];
  for (int i = 0; i < SHA256_DIGEST_LENGTH; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  if (std::string(hex) != kTableSha256) {
    throw std::runtime_error("direction table '" + path + "' has SHA-256 " + hex + ", not the published " +
                             kTableSha256);
  }
}

void direction(uint32_t seed, size_t n, bool gaussian, const GaussianTable& table, std::vector<float>& out) {
  out.resize(n);
  uint32_t k1 = hash32(seed ^ 0x9E3779B9u);
  uint32_t k2 = hash32(k1 + 0x632BE5ABu);
  for (size_t i = 0; i < n; ++i) {
    uint32_t b = hash32(hash32(static_cast<uint32_t>(i) ^ k1) ^ k2);
    out[i] = gaussian ? table[b >> 16] : ((b >> 31) ? 1.0f : -1.0f);
  }
}

std::vector<uint32_t> pool_seeds(const SeedSpec& spec) {
  std::vector<uint32_t> pool(spec.pool_size);
  for (int k = 0; k < spec.pool_size; ++k) pool[k] = derive_seed({spec.run_seed, POOL_SEED, uint64_t(k)});
  return pool;
}

std::vector<uint32_t> step_seeds(const SeedSpec& spec, uint64_t rnd, uint64_t partition, uint64_t step) {
  std::vector<uint32_t> seeds(spec.q);
  std::vector<uint32_t> pool = spec.pool_size ? pool_seeds(spec) : std::vector<uint32_t>{};
  for (int i = 0; i < spec.q; ++i) {
    std::vector<uint64_t> parts{spec.run_seed, spec.pool_size ? uint64_t(POOL_INDEX)
                                                              : uint64_t(spec.client_scope ? CLIENT_SCOPE : ROUND_SCOPE),
                                rnd};
    if (spec.client_scope) parts.push_back(partition);
    parts.push_back(step);
    parts.push_back(uint64_t(i));
    uint32_t s = derive_seed(parts);
    seeds[i] = spec.pool_size ? pool[s % uint32_t(spec.pool_size)] : s;
  }
  return seeds;
}

std::vector<uint32_t> private_seeds(uint64_t run_seed, uint64_t domain, uint64_t tag, uint64_t partition,
                                    uint64_t step, int q) {
  std::vector<uint32_t> seeds(q);
  for (int i = 0; i < q; ++i) seeds[i] = derive_seed({run_seed, domain, tag, partition, step, uint64_t(i)});
  return seeds;
}

}  // namespace fedprge

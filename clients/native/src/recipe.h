// The float32 update recipe of docs/devices.md §2 (fedprge.engine.estimator.finish_step, federation/updates.py),
// written so that every operation rounds to float32 exactly where PyTorch's does.
#pragma once

#include <cstdint>
#include <vector>

#include "rng.h"

namespace fedprge {

struct ZO {
  int q = 4;
  double eps = 0.01;
  double lr = 0.001;
  double clip = 0.0;  // RMS bound on a step's projected gradients (0: off)
  bool gaussian = true;
};

// PyTorch's float32 sum of a contiguous vector on CPU (ATen's cascade sum: 8 float lanes, 4 accumulators),
// reproduced so that a mean or RMS here equals the Python client's bit for bit.
float torch_sum(const float* x, size_t n);

// g_i = f32(losses[i] - losses[q+i]) / f32(2 eps), then scaled to RMS <= clip (estimator.clip_rms).
std::vector<float> projected_grads(const std::vector<float>& losses, const ZO& zo);

// b <- b - f32(lr/q) * sum_i g_i z(seeds_i), accumulated in order (estimator.apply_update).
void apply_update(std::vector<float>& b, const std::vector<uint32_t>& seeds, const std::vector<float>& g,
                  const ZO& zo, const GaussianTable& table);

// b <- b - f32(scale) * sum_k coefs_k z(seeds_k) (protocol.apply_coefficients); scale = lr / q.
void apply_coefficients(std::vector<float>& b, const std::vector<uint32_t>& seeds, const float* coefs,
                        double scale, bool gaussian, const GaussianTable& table);

// One round's aggregated seed-form update and the catch-up over a list of them (updates.catch_up).
struct RoundUpdate {
  int64_t round = 0;
  std::vector<uint32_t> seeds;
  std::vector<float> coefs;
};
// Applies the updates after `synced` in order; returns the new synced round. Throws on a gap.
int64_t catch_up(std::vector<float>& b, int64_t synced, const std::vector<RoundUpdate>& updates, const ZO& zo,
                 const GaussianTable& table);

}  // namespace fedprge

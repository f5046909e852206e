#include "recipe.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace fedprge {

namespace {

// ATen row_sum: `size` values at stride `stride`, 4 interleaved accumulators, the tail into the first.
template <typename Acc, typename Load>
Acc row_sum(size_t size, Load load) {
  Acc acc[4] = {Acc{}, Acc{}, Acc{}, Acc{}};
  size_t rows = size / 4;
  for (size_t j = 0; j < rows; ++j)
    for (size_t k = 0; k < 4; ++k) acc[k] = acc[k] + load(j * 4 + k);
  for (size_t i = rows * 4; i < size; ++i) acc[0] = acc[0] + load(i);
  for (size_t k = 1; k < 4; ++k) acc[0] = acc[0] + acc[k];
  return acc[0];
}

constexpr size_t kLanes = 8;
struct Lanes {
  float v[kLanes] = {};
  Lanes operator+(const Lanes& o) const {
    Lanes r;
    for (size_t l = 0; l < kLanes; ++l) r.v[l] = v[l] + o.v[l];
    return r;
  }
};

}  // namespace

float torch_sum(const float* x, size_t n) {
  // Exact for n < 8 * 16 (one level of ATen's multi-level cascade), far above any q or batch used here.
  if (n < kLanes) return row_sum<float>(n, [&](size_t i) { return x[i]; });
  size_t vectors = n / kLanes;
  Lanes lanes = row_sum<Lanes>(vectors, [&](size_t i) {
    Lanes l;
    for (size_t k = 0; k < kLanes; ++k) l.v[k] = x[i * kLanes + k];
    return l;
  });
  float total = 0.0f;
  for (size_t i = vectors * kLanes; i < n; ++i) total += x[i];
  for (size_t l = 0; l < kLanes; ++l) total += lanes.v[l];
  return total;
}

std::vector<float> projected_grads(const std::vector<float>& losses, const ZO& zo) {
  const int q = zo.q;
  if (losses.size() != size_t(2 * q)) {
    throw std::runtime_error("a P-RGE step with q=" + std::to_string(q) + " needs " + std::to_string(2 * q) +
                             " losses, got " + std::to_string(losses.size()));
  }
  const float two_eps = static_cast<float>(2 * zo.eps);
  std::vector<float> g(q);
  for (int i = 0; i < q; ++i) g[i] = (losses[i] - losses[q + i]) / two_eps;
  if (zo.clip <= 0) return g;
  double squares = 0.0;  // the scale in float64, in order, as estimator.clip_rms (exact squares, IEEE sum and sqrt)
  for (int i = 0; i < q; ++i) squares += double(g[i]) * double(g[i]);
  const double rms = std::sqrt(squares / q);
  if (rms > zo.clip) {
    const float scale = static_cast<float>(zo.clip / rms);
    for (float& v : g) v = v * scale;
  }
  return g;
}

void apply_coefficients(std::vector<float>& b, const std::vector<uint32_t>& seeds, const float* coefs,
                        double scale, bool gaussian, const GaussianTable& table) {
  std::vector<float> acc(b.size(), 0.0f), z;
  for (size_t k = 0; k < seeds.size(); ++k) {
    direction(seeds[k], b.size(), gaussian, table, z);
    const float c = coefs[k];
    for (size_t j = 0; j < b.size(); ++j) {
      const float term = c * z[j];  // two roundings, as `acc += c * z` in PyTorch: no fused multiply-add
      acc[j] = acc[j] + term;
    }
  }
  const float s = static_cast<float>(scale);
  for (size_t j = 0; j < b.size(); ++j) {
    const float step = s * acc[j];
    b[j] = b[j] - step;
  }
}

void apply_update(std::vector<float>& b, const std::vector<uint32_t>& seeds, const std::vector<float>& g,
                  const ZO& zo, const GaussianTable& table) {
  apply_coefficients(b, seeds, g.data(), zo.lr / seeds.size(), zo.gaussian, table);
}

int64_t catch_up(std::vector<float>& b, int64_t synced, const std::vector<RoundUpdate>& updates, const ZO& zo,
                 const GaussianTable& table) {
  for (const RoundUpdate& u : updates) {
    if (u.round <= synced) continue;
    if (u.round != synced + 1) {
      throw std::runtime_error("seed update for round " + std::to_string(u.round) +
                               " arrived but this node is at round " + std::to_string(synced));
    }
    apply_coefficients(b, u.seeds, u.coefs.data(), zo.lr / zo.q, zo.gaussian, table);
    synced = u.round;
  }
  return synced;
}

}  // namespace fedprge

// A P-RGE .pte run through ExecuTorch's Program/Method API: `forward` (the 2q perturbed losses), `nll` (per-example
// summed NLL and token counts) and `directions` (the in-program z, for testing). Shapes are static and read from
// the method metadata; one method is loaded at a time (each XNNPACK method packs its own copy of the weights).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fedprge {

// A batch in the program's static shape (batch_size x seq_len), row-major.
struct Batch {
  std::vector<int64_t> ids, mask, labels;
};

class Program {
 public:
  // Throws std::runtime_error naming the path when the file is missing or is not a P-RGE program.
  Program(const std::string& path, int threads);
  ~Program();
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;

  int64_t batch_size() const { return batch_size_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t q() const { return q_; }
  int64_t num_params() const { return num_params_; }
  const std::string& path() const { return path_; }

  std::vector<float> losses(const Batch& batch, const std::vector<uint32_t>& seeds, const std::vector<float>& b);
  void nll(const Batch& batch, const std::vector<float>& b, std::vector<float>& sums, std::vector<int64_t>& counts);
  std::vector<float> directions(const std::vector<uint32_t>& seeds);  // (q x P), row-major

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  int64_t batch_size_ = 0, seq_len_ = 0, q_ = 0, num_params_ = 0;
};

}  // namespace fedprge

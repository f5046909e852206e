// A client's own data, exported for one partition by `python clients/native/client_data.py`: tokenized train,
// validation and test examples, and the minibatch indices the Python client's sampler draws
// (fedprge.data.sample_indices with the BATCH and PERSONAL seeds), so both clients see identical batches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "program.h"
#include "run_config.h"

namespace fedprge {

struct Example {
  int n_prompt = 0;          // leading prompt tokens (label -100)
  std::vector<int64_t> ids;  // prompt + target, already truncated to data.max_len
};

class ClientData {
 public:
  // Throws naming the path when the file is missing or not a client data file.
  static ClientData load(const std::string& path);

  // Throws one line naming the first setting of the run that this data was not exported for.
  void check(const RunConfig& cfg) const;

  int partition() const { return partition_; }
  const std::vector<Example>& train() const { return train_; }
  const std::vector<Example>& val() const { return val_; }
  const std::vector<Example>& test() const { return test_; }
  int64_t pad_token_id() const { return pad_; }

  // The examples of local step `step` of round `rnd`, and of personalization step `step` with tag 1 or 2.
  std::vector<const Example*> train_batch(int64_t rnd, int step) const;
  std::vector<const Example*> personal_batch(int tag, int step) const;

 private:
  int partition_ = 0;
  int64_t pad_ = 0;
  std::string config_yaml_;
  std::vector<Example> train_, val_, test_;
  int rounds_ = 0;
  std::vector<std::vector<std::vector<int>>> train_idx_;  // [round-1][step] -> indices
  std::vector<std::vector<std::vector<int>>> personal_idx_;  // [tag-1][step] -> indices
};

// `rows` padded as encode() + PTEProgram.pad do: to the longest of `group` with the data's pad id, then to the
// program's (batch_size, seq_len) with the program's pad id; unused rows are unlabelled with mask 1.
Batch make_batch(const std::vector<const Example*>& rows, size_t width, int64_t data_pad, int64_t program_pad,
                 const Program& program);
size_t longest(const std::vector<const Example*>& rows);

}  // namespace fedprge

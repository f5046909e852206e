// The machine-learning side of a native client (fedprge/task.py's Task on a .pte): local P-RGE steps, held-out
// losses and the personalization methods, on this client's exported data. Knows nothing of Flower.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "client_data.h"
#include "program.h"
#include "recipe.h"
#include "rng.h"
#include "run_config.h"

namespace fedprge {

struct StepResult {
  std::vector<float> losses;  // the program's 2q losses
  std::vector<float> g;       // the q projected gradients actually applied
};

struct TrainResult {
  std::vector<float> b;
  std::vector<float> projected_grads;  // local_steps x q, step-major
  double loss = 0;                     // mean of the steps' mean perturbed losses
  std::vector<StepResult> steps;
};

// A personalized B and the hyper-parameters chosen for it (reported as <method>_<name> metrics).
struct Personalized {
  std::vector<float> b;
  std::vector<std::pair<std::string, double>> chosen;
  std::vector<bool> chosen_is_int;
};

class Trainer {
 public:
  Trainer(const RunConfig& cfg, Program& program, const ClientData& data, const GaussianTable& table);

  StepResult step(std::vector<float>& b, const std::vector<uint32_t>& seeds, const std::vector<const Example*>& rows);
  TrainResult train(std::vector<float> b, int64_t rnd);
  // {"loss", "ppl"} of b on `examples` (empty map without examples), as fedprge.evaluate.evaluate computes them.
  std::map<std::string, double> evaluate(const std::vector<float>& b, const std::vector<Example>& examples);
  // Task.adapt: `steps` private P-RGE steps, keeping the checkpoint of lowest validation loss; returns (b, k).
  std::pair<std::vector<float>, int> adapt(std::vector<float> b, int steps, int tag);
  // personalize(): the B of every method, in the order asked.
  std::vector<std::pair<std::string, Personalized>> personalize(const std::vector<std::string>& methods,
                                                                 const std::vector<float>& b_global,
                                                                 const std::vector<float>* personal);

  int64_t num_params() const { return program_.num_params(); }

 private:
  const RunConfig& cfg_;
  Program& program_;
  const ClientData& data_;
  const GaussianTable& table_;
  int64_t program_pad_;
};

}  // namespace fedprge

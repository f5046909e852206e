#include "trainer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

namespace fedprge {

namespace {

constexpr int kEvalBatch = 16;  // fedprge.evaluate.evaluate encodes 16 examples at a time
constexpr int kFinetune = 1, kLocal = 2;

std::vector<int> checkpoints(int steps) {
  std::vector<int> out{0};
  for (int k = 1; k < steps; k *= 2) out.push_back(k);
  if (steps > 0) out.push_back(steps);
  return out;
}

}  // namespace

Trainer::Trainer(const RunConfig& cfg, Program& program, const ClientData& data, const GaussianTable& table)
    : cfg_(cfg), program_(program), data_(data), table_(table) {
  program_pad_ = ProgramSpec::load(program.path()).pad_token_id;
}

StepResult Trainer::step(std::vector<float>& b, const std::vector<uint32_t>& seeds, const std::vector<const Example*>& rows) {
  Batch batch = make_batch(rows, longest(rows), data_.pad_token_id(), program_pad_, program_);
  StepResult r;
  r.losses = program_.losses(batch, seeds, b);
  r.g = projected_grads(r.losses, cfg_.zo);
  apply_update(b, seeds, r.g, cfg_.zo, table_);
  return r;
}

TrainResult Trainer::train(std::vector<float> b, int64_t rnd) {
  TrainResult out;
  double total = 0;
  for (int t = 0; t < cfg_.local_steps; ++t) {
    StepResult r = step(b, step_seeds(cfg_.spec, uint64_t(rnd), uint64_t(data_.partition()), uint64_t(t)),
                        data_.train_batch(rnd, t));
    out.projected_grads.insert(out.projected_grads.end(), r.g.begin(), r.g.end());
    total += double(torch_sum(r.losses.data(), r.losses.size()) / float(r.losses.size()));
    out.steps.push_back(std::move(r));
  }
  out.loss = total / cfg_.local_steps;
  out.b = std::move(b);
  return out;
}

std::map<std::string, double> Trainer::evaluate(const std::vector<float>& b, const std::vector<Example>& examples) {
  if (examples.empty()) return {};
  const size_t bs = size_t(program_.batch_size());
  double total = 0;
  int64_t count = 0;
  std::vector<float> sums, part;
  std::vector<int64_t> counts;
  for (size_t i = 0; i < examples.size(); i += kEvalBatch) {
    std::vector<const Example*> chunk;
    for (size_t j = i; j < std::min(examples.size(), i + kEvalBatch); ++j) chunk.push_back(&examples[j]);
    const size_t width = longest(chunk);
    sums.clear();
    for (size_t k = 0; k < chunk.size(); k += bs) {
      std::vector<const Example*> rows(chunk.begin() + k, chunk.begin() + std::min(chunk.size(), k + bs));
      program_.nll(make_batch(rows, width, data_.pad_token_id(), program_pad_, program_), b, part, counts);
      sums.insert(sums.end(), part.begin(), part.begin() + rows.size());
      for (size_t r = 0; r < rows.size(); ++r) count += counts[r];
    }
    total += double(torch_sum(sums.data(), sums.size()));
  }
  double loss = total / double(std::max<int64_t>(count, 1));
  return {{"loss", loss}, {"ppl", std::exp(std::min(loss, 50.0))}};
}

std::pair<std::vector<float>, int> Trainer::adapt(std::vector<float> b, int steps, int tag) {
  const bool select = !data_.val().empty();
  std::vector<float> best = b;
  int best_k = 0;
  double best_loss = select ? evaluate(b, data_.val()).at("loss") : std::numeric_limits<double>::infinity();
  std::vector<int> marks_v = checkpoints(steps);
  std::set<int> marks(marks_v.begin(), marks_v.end());
  for (int t = 0; t < steps; ++t) {
    step(b, private_seeds(cfg_.seed, PERSONAL, uint64_t(tag), uint64_t(data_.partition()), uint64_t(t), cfg_.zo.q),
         data_.personal_batch(tag, t));
    if (select && marks.count(t + 1)) {
      double loss = evaluate(b, data_.val()).at("loss");
      if (loss < best_loss) {
        best = b;
        best_k = t + 1;
        best_loss = loss;
      }
    }
  }
  if (!select) return {b, steps};
  return {best, best_k};
}

std::vector<std::pair<std::string, Personalized>> Trainer::personalize(const std::vector<std::string>& methods,
                                                                        const std::vector<float>& b_global,
                                                                        const std::vector<float>* personal) {
  std::map<std::string, Personalized> out;
  const int steps = cfg_.personal_steps;
  for (const std::string& m : methods) {
    Personalized p;
    if (m == "global") {
      p.b = b_global;
    } else if (m == "finetune" || m == "local") {
      auto r = adapt(m == "finetune" ? b_global : std::vector<float>(b_global.size(), 0.0f), steps,
                     m == "finetune" ? kFinetune : kLocal);
      p.b = std::move(r.first);
      p.chosen = {{"steps", double(r.second)}};
      p.chosen_is_int = {true};
    } else if (m == "prior") {  // a .pte gives per-example sums only: the LM prior is unavailable, and says so
      p.b = out.count("finetune") ? out["finetune"].b : adapt(b_global, steps, kFinetune).first;
      if (!data_.train().empty() && !data_.val().empty()) {
        p.chosen = {{"unavailable", 1.0}};
        p.chosen_is_int = {false};
      }
    } else if (m == "personal") {
      p.b = personal && !personal->empty() ? *personal : b_global;
    } else {
      throw std::runtime_error("personalization method '" + m + "' is not implemented by the native client");
    }
    out[m] = std::move(p);
  }
  std::vector<std::pair<std::string, Personalized>> ordered;
  for (const std::string& m : methods) ordered.emplace_back(m, out[m]);
  return ordered;
}

}  // namespace fedprge

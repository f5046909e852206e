#include "client_data.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "json.h"

namespace fedprge {

namespace {

std::vector<Example> examples(const Json& rows) {
  std::vector<Example> out;
  for (const Json& r : rows.items()) {
    Example e;
    e.n_prompt = int(r[0].integer());
    for (const Json& t : r[1].items()) e.ids.push_back(t.integer());
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<std::vector<int>> index_rows(const Json& steps) {
  std::vector<std::vector<int>> out;
  for (const Json& s : steps.items()) {
    std::vector<int> idx;
    for (const Json& i : s.items()) idx.push_back(int(i.integer()));
    out.push_back(std::move(idx));
  }
  return out;
}

}  // namespace

ClientData ClientData::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("client data file '" + path + "' does not exist; export it with: python clients/native/client_data.py");
  std::stringstream ss;
  ss << f.rdbuf();
  Json j;
  try {
    j = Json::parse(ss.str());
    if (!j.has("format") || j["format"].str() != "fedprge-client-data/1") throw std::runtime_error("no format tag");
  } catch (const std::exception& e) {
    throw std::runtime_error("'" + path + "' is not a fedprge client data file (" + e.what() + ")");
  }
  ClientData d;
  d.partition_ = int(j["partition"].integer());
  d.pad_ = j["pad_token_id"].integer();
  d.config_yaml_ = j["config"].str();
  d.train_ = examples(j["train"]);
  d.val_ = examples(j["val"]);
  d.test_ = examples(j["test"]);
  for (const Json& r : j["train_batches"].items()) d.train_idx_.push_back(index_rows(r));
  d.rounds_ = int(d.train_idx_.size());
  for (const char* tag : {"1", "2"}) d.personal_idx_.push_back(index_rows(j["personal_batches"][tag]));
  return d;
}

void ClientData::check(const RunConfig& cfg) const {
  FlatYaml mine = FlatYaml::parse(config_yaml_);
  auto differs = [&](const std::string& key) {
    const std::string have = mine.get(key, "(unset)"), want = cfg.yaml.get(key, "(unset)");
    if (have != want) {
      throw std::runtime_error("client data of partition " + std::to_string(partition_) + " was exported for " +
                               key + "=" + have + ", the run has " + want +
                               "; export it again with: python clients/native/client_data.py --partition " +
                               std::to_string(partition_) + " (with the run's config)");
    }
  };
  for (const char* key : {"seed", "model.name", "federation.clients", "federation.batch_size",
                          "federation.local_steps", "eval.personal_steps"}) {
    differs(key);
  }
  for (const auto& kv : mine.scalars)
    if (kv.first.rfind("data.", 0) == 0) differs(kv.first);
  if (cfg.rounds > rounds_) {
    throw std::runtime_error("client data of partition " + std::to_string(partition_) + " has batches for " +
                             std::to_string(rounds_) + " rounds, the run has federation.rounds=" +
                             std::to_string(cfg.rounds) + "; export it again with --rounds " + std::to_string(cfg.rounds));
  }
}

std::vector<const Example*> ClientData::train_batch(int64_t rnd, int step) const {
  if (rnd < 1 || rnd > rounds_ || step < 0 || step >= int(train_idx_[rnd - 1].size())) {
    throw std::runtime_error("client data has no batch for round " + std::to_string(rnd) + " step " +
                             std::to_string(step) + " (exported: " + std::to_string(rounds_) + " rounds)");
  }
  std::vector<const Example*> rows;
  for (int i : train_idx_[rnd - 1][step]) rows.push_back(&train_.at(i));
  return rows;
}

std::vector<const Example*> ClientData::personal_batch(int tag, int step) const {
  if (tag < 1 || tag > 2 || step < 0 || step >= int(personal_idx_[tag - 1].size())) {
    throw std::runtime_error("client data has no personalization batch for tag " + std::to_string(tag) + " step " +
                             std::to_string(step));
  }
  std::vector<const Example*> rows;
  for (int i : personal_idx_[tag - 1][step]) rows.push_back(&train_.at(i));
  return rows;
}

size_t longest(const std::vector<const Example*>& rows) {
  size_t w = 0;
  for (const Example* e : rows) w = std::max(w, e->ids.size());
  return w;
}

Batch make_batch(const std::vector<const Example*>& rows, size_t width, int64_t data_pad, int64_t program_pad,
                 const Program& program) {
  const size_t bs = size_t(program.batch_size()), t = size_t(program.seq_len());
  if (rows.size() > bs || width > t) {
    throw std::runtime_error("a batch of " + std::to_string(rows.size()) + " x " + std::to_string(width) +
                             " tokens does not fit '" + program.path() + "', exported for " + std::to_string(bs) +
                             " x " + std::to_string(t));
  }
  Batch b;
  b.ids.assign(bs * t, program_pad);
  b.mask.assign(bs * t, 0);
  b.labels.assign(bs * t, -100);
  for (size_t r = 0; r < bs; ++r) {
    if (r >= rows.size()) {  // an unused row: an ordinary unlabelled sequence (a fully masked one makes SDPA NaN)
      for (size_t c = 0; c < t; ++c) b.mask[r * t + c] = 1;
      continue;
    }
    const Example& e = *rows[r];
    for (size_t c = 0; c < width; ++c) b.ids[r * t + c] = data_pad;
    for (size_t c = 0; c < e.ids.size(); ++c) {
      b.ids[r * t + c] = e.ids[c];
      b.mask[r * t + c] = 1;
      if (int(c) >= e.n_prompt) b.labels[r * t + c] = e.ids[c];
    }
  }
  return b;
}

}  // namespace fedprge

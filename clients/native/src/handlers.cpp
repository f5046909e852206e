#include "handlers.h"

#include <cstring>
#include <iostream>

namespace fedprge {

namespace {

std::string pack_f32(const std::vector<float>& v) {
  std::string out(v.size() * 4, '\0');
  std::memcpy(&out[0], v.data(), out.size());  // little-endian hosts only (x86-64, arm64)
  return out;
}

void add(flwr::proto::ConfigRecord& r, const std::string& key, int64_t v) {
  auto* item = r.add_items();
  item->set_key(key);
  item->mutable_value()->set_sint64(v);
}

void add_bytes(flwr::proto::ConfigRecord& r, const std::string& key, const std::string& v) {
  auto* item = r.add_items();
  item->set_key(key);
  item->mutable_value()->set_bytes(v);
}

void metric(flwr::proto::MetricRecord& r, const std::string& key, double v, bool integer) {
  auto* item = r.add_items();
  item->set_key(key);
  if (integer) {
    item->mutable_value()->set_sint64(int64_t(v));
  } else {
    item->mutable_value()->set_double_(v);
  }
}

std::vector<int64_t> int_list(const RecordDict& rd, const std::string& key) {
  const auto& v = config_field(rd, "state", key);
  std::vector<int64_t> out;
  if (v.has_sint_list()) {
    out.assign(v.sint_list().vals().begin(), v.sint_list().vals().end());
  } else if (v.has_uint_list()) {
    for (auto x : v.uint_list().vals()) out.push_back(int64_t(x));
  } else if (!((v.has_bool_list() && v.bool_list().vals_size() == 0) ||
               (v.has_double_list() && v.double_list().vals_size() == 0))) {
    throw std::runtime_error("seed state field '" + key + "' must be a list of integers");
  }
  return out;
}

std::string bytes_field(const RecordDict& rd, const std::string& key) {
  const auto& v = config_field(rd, "state", key);
  if (!v.has_bytes()) throw std::runtime_error("a float32/uint32 state field '" + key + "' must be bytes");
  if (v.bytes().size() % 4) throw std::runtime_error("state field '" + key + "' has " + std::to_string(v.bytes().size()) + " bytes, not a multiple of 4");
  return v.bytes();
}

bool config_bool(const RecordDict& rd, const std::string& record, const std::string& key, bool fallback) {
  const Record* r = find_record(rd, record);
  if (!r) return fallback;
  for (const auto& item : r->config.items())
    if (item.key() == key) return item.value().has_bool_() ? item.value().bool_() : fallback;
  return fallback;
}

}  // namespace

Handlers::Handlers(const ClientFiles& files)
    : files_(files),
      program_(files.pte, files.threads),
      data_(ClientData::load(files.data)),
      table_(files.table),
      state_(NodeState::load(files.state)) {
  ProgramSpec spec = ProgramSpec::load(files.pte);  // refuse a program without its spec before connecting
  if (spec.num_params != program_.num_params() || spec.q != program_.q()) {
    throw SetupError("the sidecar spec of '" + files.pte + "' does not describe it: the program has q=" +
                     std::to_string(program_.q()) + ", P=" + std::to_string(program_.num_params()) + ", the spec q=" +
                     std::to_string(spec.q) + ", P=" + std::to_string(spec.num_params));
  }
}

void Handlers::remember_node_id(uint64_t id) {
  state_.node_id = id;
  state_.save(files_.state);
}

RecordDict Handlers::handle(const Message& msg) {
  const std::string& type = msg.metadata.message_type();
  if (type == "query") return query(msg);
  if (type == "train") return train(msg);
  if (type == "evaluate") return evaluate(msg);
  throw std::runtime_error("message type '" + type + "' is not handled by the native client");
}

void Handlers::setup(uint64_t run_id) {
  if (state_.config_yaml.empty() || state_.run_id != run_id) {
    throw std::runtime_error("this node has not been registered for run " + std::to_string(run_id) +
                             " (no 'query' message received yet)");
  }
  if (cfg_) return;
  try {
    cfg_ = std::make_unique<RunConfig>(RunConfig::from_yaml(state_.config_yaml));
    check_spec(*cfg_, ProgramSpec::load(files_.pte), files_.pte);
    data_.check(*cfg_);
  } catch (const std::exception& e) {
    cfg_.reset();
    throw SetupError(e.what());
  }
  trainer_ = std::make_unique<Trainer>(*cfg_, program_, data_, table_);
}

RecordDict Handlers::query(const Message& msg) {
  const uint64_t run_id = msg.metadata.run_id();
  const std::string yaml = config_string(msg.content, "setup", "config");
  if (state_.run_id != run_id || state_.config_yaml != yaml) {  // a new run: start from zero B
    const uint64_t node_id = state_.node_id;
    state_ = NodeState{};
    state_.node_id = node_id;
    state_.run_id = run_id;
    state_.config_yaml = yaml;
    cfg_.reset();
    trainer_.reset();
  }
  setup(run_id);
  state_.save(files_.state);
  Record info;
  add(info.config, "partition", data_.partition());
  add(info.config, "num_examples", int64_t(data_.train().size()));
  add(info.config, "num_params", program_.num_params());
  return {{"info", info}};
}

std::vector<float> Handlers::sync_global(const Message& msg, bool keep) {
  const RecordDict& rd = msg.content;
  const std::string kind = config_string(rd, "round", "downlink");
  const int64_t rnd = config_int(rd, "round", "round");
  const size_t p = size_t(program_.num_params());
  std::vector<float> b;
  int64_t synced = 0;
  if (kind == "weights") {
    const Record* r = find_record(rd, "state");
    if (!r || r->kind != Record::Kind::Array || r->arrays.empty() || r->arrays[0].first != "b") {
      throw std::runtime_error("the weights state has no array 'b'");
    }
    b = r->arrays[0].second.float32();
    if (b.size() != p) throw std::runtime_error("downlinked B has " + std::to_string(b.size()) + " entries; the adapters have " + std::to_string(p));
    synced = rnd - 1;
  } else if (kind == "pool") {
    const std::string coefs = bytes_field(rd, "coefs");
    std::vector<uint32_t> pool = pool_seeds(cfg_->spec);
    if (coefs.size() / 4 != pool.size()) throw std::runtime_error("pool state has " + std::to_string(coefs.size() / 4) + " coefficients for a pool of " + std::to_string(pool.size()));
    b.assign(p, 0.0f);
    std::vector<float> c(pool.size());
    std::memcpy(c.data(), coefs.data(), coefs.size());
    apply_coefficients(b, pool, c.data(), cfg_->zo.lr / cfg_->zo.q, cfg_->zo.gaussian, table_);
    synced = rnd - 1;
  } else if (kind == "seeds") {
    const std::string seeds = bytes_field(rd, "seeds"), coefs = bytes_field(rd, "coefs");
    const std::vector<int64_t> sizes = int_list(rd, "sizes"), rounds = int_list(rd, "rounds");
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    if (total != int64_t(seeds.size() / 4) || seeds.size() != coefs.size() || sizes.size() != rounds.size()) {
      throw std::runtime_error("inconsistent seed update: " + std::to_string(sizes.size()) + " sizes summing to " +
                               std::to_string(total) + ", " + std::to_string(seeds.size() / 4) + " seeds, " +
                               std::to_string(coefs.size() / 4) + " coefs, " + std::to_string(rounds.size()) + " rounds");
    }
    std::vector<RoundUpdate> updates;
    size_t start = 0;
    for (size_t i = 0; i < rounds.size(); ++i) {
      if (i && rounds[i] <= rounds[i - 1]) throw std::runtime_error("seed update rounds must increase strictly");
      RoundUpdate u;
      u.round = rounds[i];
      u.seeds.resize(size_t(sizes[i]));
      u.coefs.resize(size_t(sizes[i]));
      std::memcpy(u.seeds.data(), seeds.data() + 4 * start, 4 * u.seeds.size());
      std::memcpy(u.coefs.data(), coefs.data() + 4 * start, 4 * u.coefs.size());
      start += u.seeds.size();
      updates.push_back(std::move(u));
    }
    b = state_.global_b.empty() ? std::vector<float>(p, 0.0f) : state_.global_b;
    synced = catch_up(b, state_.synced, updates, cfg_->zo, table_);
  } else {
    throw std::runtime_error("unknown downlink kind '" + kind + "'");
  }
  if (keep) {
    if (kind == "seeds" && synced != state_.synced && state_.synced > 0) {
      std::cerr << "fedprge-client: caught up from round " << state_.synced << " to " << synced << "\n";
    }
    state_.global_b = b;
    state_.synced = synced;
    state_.save(files_.state);
  }
  return b;
}

RecordDict Handlers::train(const Message& msg) {
  setup(msg.metadata.run_id());
  const int64_t rnd = config_int(msg.content, "round", "round");
  std::vector<float> b = sync_global(msg, true);
  TrainResult res = trainer_->train(std::move(b), rnd);
  state_.personal_b = res.b;
  state_.save(files_.state);
  Record update, metrics;
  add_bytes(update.config, "projected_grads", pack_f32(res.projected_grads));
  add(update.config, "num_examples", int64_t(data_.train().size()));
  metrics.kind = Record::Kind::Metric;
  metric(metrics.metric, "train_loss", res.loss, false);
  return {{"update", update}, {"metrics", metrics}};
}

RecordDict Handlers::evaluate(const Message& msg) {
  setup(msg.metadata.run_id());
  const Record* ev = find_record(msg.content, "eval");
  if (!ev) throw std::runtime_error("the evaluate message has no 'eval' record");
  for (const auto& item : ev->config.items()) {
    if (item.key() == "save" && !item.value().string().empty()) {
      throw std::runtime_error("eval.save (export.personal) is not implemented by the native client");
    }
  }
  const bool sync = config_bool(msg.content, "eval", "sync", true);
  std::vector<float> b = sync_global(msg, sync);
  const auto& m = config_field(msg.content, "eval", "methods");
  std::vector<std::string> methods(m.string_list().vals().begin(), m.string_list().vals().end());
  Record metrics;
  metrics.kind = Record::Kind::Metric;
  metric(metrics.metric, "partition", data_.partition(), true);
  metric(metrics.metric, "num_examples", double(data_.test().size()), true);
  if (config_bool(msg.content, "eval", "validate", false) && !data_.val().empty()) {  // the final evaluation
    metric(metrics.metric, "global_val_loss", trainer_->evaluate(b, data_.val()).at("loss"), false);
  }
  for (const auto& [method, p] : trainer_->personalize(methods, b, &state_.personal_b)) {
    for (const auto& [k, v] : trainer_->evaluate(p.b, data_.test())) metric(metrics.metric, method + "_" + k, v, false);
    for (size_t i = 0; i < p.chosen.size(); ++i) {
      metric(metrics.metric, method + "_" + p.chosen[i].first, p.chosen[i].second, p.chosen_is_int[i]);
    }
  }
  return {{"metrics", metrics}};
}

}  // namespace fedprge

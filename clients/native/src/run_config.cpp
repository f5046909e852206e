#include "run_config.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include "json.h"

namespace fedprge {

namespace {

[[noreturn]] void unsupported(const std::string& what) {
  throw std::runtime_error(what + "; the native client does not implement it (use a Python SuperNode)");
}

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

}  // namespace

RunConfig RunConfig::from_yaml(const std::string& text) {
  RunConfig c;
  c.yaml = FlatYaml::parse(text);
  const FlatYaml& y = c.yaml;
  c.seed = uint64_t(y.integer("seed"));
  c.model = y.get("model.name");
  c.zo.q = int(y.integer("zo.q"));
  c.zo.eps = y.number("zo.eps");
  c.zo.lr = y.number("zo.lr");
  c.zo.clip = y.number("zo.clip");
  const std::string dist = y.get("zo.distribution");
  if (dist != "gaussian" && dist != "rademacher") unsupported("zo.distribution=" + dist);
  c.zo.gaussian = dist == "gaussian";
  c.local_steps = int(y.integer("federation.local_steps"));
  c.batch_size = int(y.integer("federation.batch_size"));
  c.max_len = int(y.integer("data.max_len"));
  c.rounds = int(y.integer("federation.rounds"));
  c.personal_steps = int(y.integer("eval.personal_steps"));
  c.downlink = y.get("federation.downlink");
  const std::string scope = y.get("federation.seed_scope");
  c.spec = SeedSpec{c.seed, c.zo.q, scope == "client", c.downlink == "pool" ? int(y.integer("federation.pool_size")) : 0};
  c.lora_rank = int(y.integer("lora.rank"));
  c.lora_alpha = y.number("lora.alpha");
  c.lora_targets = y.list("lora.target_modules");
  c.lora_a_seed = uint64_t(y.integer("lora.a_seed"));

  if (y.get("federation.algorithm") != "prge") unsupported("federation.algorithm=" + y.get("federation.algorithm"));
  if (c.downlink != "weights" && c.downlink != "seeds" && c.downlink != "pool") unsupported("federation.downlink=" + c.downlink);
  if (scope != "client" && scope != "round") unsupported("federation.seed_scope=" + scope);
  if (y.get("privacy.mode", "off") != "off") unsupported("privacy.mode=" + y.get("privacy.mode"));
  if (y.get("federation.verify", "false") == "true") unsupported("federation.verify=true");
  if (y.get("eval.trace", "false") == "true") unsupported("eval.trace=true");
  if (!y.get("export.personal", "").empty()) unsupported("export.personal=" + y.get("export.personal"));
  for (const char* key : {"faults.drop_rate", "faults.straggler_rate", "faults.poison_fraction",
                          "faults.eval_straggler_rate", "faults.eval_drop_rate"}) {
    if (y.has(key) && y.number(key) != 0) unsupported(std::string(key) + "=" + y.get(key) + " (injected faults)");
  }
  for (const auto& kv : y.scalars) {  // SecAgg+ (privacy.secagg) masks the uplink: a different reply
    const std::string& k = kv.first;
    if (k.size() >= 7 && k.compare(k.size() - 7, 7, ".secagg") == 0 && kv.second == "true") unsupported(k + "=true");
  }
  for (const std::string& m : y.list("eval.personalization")) {
    if (m != "global" && m != "finetune" && m != "local" && m != "personal" && m != "prior") {
      unsupported("eval.personalization method '" + m + "'");
    }
  }
  return c;
}

ProgramSpec ProgramSpec::load(const std::string& pte_path) {
  size_t dot = pte_path.rfind('.'), slash = pte_path.rfind('/');
  std::string sidecar = (dot == std::string::npos || (slash != std::string::npos && dot < slash))
                            ? pte_path + ".json"
                            : pte_path.substr(0, dot) + ".json";
  std::ifstream f(sidecar);
  if (!f) {
    throw std::runtime_error("'" + pte_path + "' has no sidecar spec '" + sidecar +
                             "' next to it; keep the .json that python -m fedprge.export writes with the .pte");
  }
  std::stringstream ss;
  ss << f.rdbuf();
  Json j = Json::parse(ss.str());
  ProgramSpec s;
  s.model = j["model"].str();
  s.num_params = j["num_params"].integer();
  s.q = j["q"].integer();
  s.eps = j["eps"].number();
  s.batch_size = j["batch_size"].integer();
  s.seq_len = j["seq_len"].integer();
  s.distribution = j["distribution"].str();
  s.rank = j["rank"].integer();
  s.alpha = j["alpha"].number();
  for (const Json& t : j["target_modules"].items()) s.targets.push_back(t.str());
  s.a_seed = uint64_t(j["a_seed"].integer());
  s.pad_token_id = j["pad_token_id"].integer();
  s.model_seed = j.has("model_seed") ? j["model_seed"].integer() : 0;
  return s;
}

void check_spec(const RunConfig& cfg, const ProgramSpec& spec, const std::string& pte_path) {
  std::vector<std::string> bad;
  auto mismatch = [&](const std::string& key, const std::string& have, const std::string& want) {
    if (have != want) bad.push_back(key + ": the program has " + have + ", the run " + want);
  };
  mismatch("zo.q", std::to_string(spec.q), std::to_string(cfg.zo.q));
  mismatch("zo.eps", fmt(spec.eps), fmt(cfg.zo.eps));
  mismatch("zo.distribution", spec.distribution, cfg.zo.gaussian ? "gaussian" : "rademacher");
  mismatch("model.name", spec.model, cfg.model);
  mismatch("lora.rank", std::to_string(spec.rank), std::to_string(cfg.lora_rank));
  mismatch("lora.alpha", fmt(spec.alpha), fmt(cfg.lora_alpha));
  mismatch("lora.a_seed", std::to_string(spec.a_seed), std::to_string(cfg.lora_a_seed));
  std::string have_t, want_t;
  for (const auto& t : spec.targets) have_t += (have_t.empty() ? "" : ",") + t;
  for (const auto& t : cfg.lora_targets) want_t += (want_t.empty() ? "" : ",") + t;
  mismatch("lora.target_modules", "[" + have_t + "]", "[" + want_t + "]");
  if (cfg.model == "tiny" && uint64_t(spec.model_seed) != cfg.seed) {
    bad.push_back("seed: the tiny model was initialised from seed " + std::to_string(spec.model_seed) +
                  ", the run uses " + std::to_string(cfg.seed));
  }
  if (spec.batch_size < cfg.batch_size) {
    bad.push_back("federation.batch_size=" + std::to_string(cfg.batch_size) + " > the program's " +
                  std::to_string(spec.batch_size) + " rows");
  }
  if (spec.seq_len < cfg.max_len) {
    bad.push_back("data.max_len=" + std::to_string(cfg.max_len) + " > the program's " + std::to_string(spec.seq_len) +
                  " tokens");
  }
  if (bad.empty()) return;
  std::string msg = "ExecuTorch program '" + pte_path + "' does not match this run: ";
  for (size_t i = 0; i < bad.size(); ++i) msg += (i ? "; " : "") + bad[i];
  throw std::runtime_error(msg + ". Export a matching one with python -m fedprge.export (see docs/devices.md §1)");
}

}  // namespace fedprge

#include "tools.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include <openssl/evp.h>

#include "client_data.h"
#include "handlers.h"
#include "json.h"
#include "state.h"
#include "objects.h"
#include "program.h"
#include "recipe.h"
#include "rng.h"
#include "run_config.h"
#include "trainer.h"

namespace fedprge {

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::string hex(float f) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", bits_of(f));
  return buf;
}

std::string list(const std::vector<float>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(bits_of(v[i]));
  return s + "]";
}

std::string ulist(const std::vector<uint64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

int print_vectors(const std::string& table_path) {
  GaussianTable table(table_path);
  std::ostringstream o;
  o << "{\"hash32\": {";
  const uint32_t xs[] = {0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF};
  for (size_t i = 0; i < 5; ++i) o << (i ? ", " : "") << "\"" << xs[i] << "\": " << hash32(xs[i]);
  o << "}, \"derive_seed\": [";
  const std::vector<std::vector<uint64_t>> parts = {{0}, {0, 1}, {0, 1, 1, 0, 0, 0}, {12345, 1, 3, 7, 2, 1}, {1ull << 32}, {(1ull << 40) + 5, 3}};
  for (size_t i = 0; i < parts.size(); ++i) o << (i ? ", " : "") << "{\"parts\": " << ulist(parts[i]) << ", \"seed\": " << derive_seed(parts[i]) << "}";
  o << "], \"step_seeds\": [";
  struct Case { uint64_t seed; bool client; uint64_t r, p, t; };
  const Case cases[] = {{0, true, 1, 3, 0}, {0, true, 2, 0, 9}, {42, false, 1, 5, 0}};
  for (size_t i = 0; i < 3; ++i) {
    const Case& c = cases[i];
    std::vector<uint32_t> s = step_seeds(SeedSpec{c.seed, 4, c.client, 0}, c.r, c.p, c.t);
    o << (i ? ", " : "") << "{\"run_seed\": " << c.seed << ", \"q\": 4, \"scope\": \"" << (c.client ? "client" : "round")
      << "\", \"round\": " << c.r << ", \"partition\": " << c.p << ", \"step\": " << c.t << ", \"seeds\": "
      << ulist(std::vector<uint64_t>(s.begin(), s.end())) << "}";
  }
  std::string raw(1 << 18, '\0');
  for (uint32_t j = 0; j < (1u << 16); ++j) {
    float v = table[j];
    std::memcpy(&raw[4 * j], &v, 4);
  }
  o << "], \"gaussian_table\": {\"file\": \"gaussian_table.f32\", \"sha256\": \"" << sha256_hex(raw) << "\", \"entries\": {";
  const uint32_t entries[] = {0, 1, 32767, 32768, 65534, 65535};
  for (size_t i = 0; i < 6; ++i) o << (i ? ", " : "") << "\"" << entries[i] << "\": \"" << hex(table[entries[i]]) << "\"";
  o << "}}, \"directions\": [";
  const uint32_t seeds[] = {0, 7, 123456789, 0xFFFFFFFF};
  const uint64_t counters[] = {0, 1, 2, 3, 1000, 184319, 1000000, (1ull << 31) + 5};
  for (size_t i = 0; i < 4; ++i) {
    uint32_t k1 = hash32(seeds[i] ^ 0x9E3779B9u);
    o << (i ? ", " : "") << "{\"seed\": " << seeds[i] << ", \"k1\": " << k1 << ", \"k2\": " << hash32(k1 + 0x632BE5ABu) << ", \"entries\": [";
    for (size_t j = 0; j < 8; ++j) {
      uint32_t b = bits(seeds[i], counters[j]);
      o << (j ? ", " : "") << "{\"counter\": " << counters[j] << ", \"bits\": " << b << ", \"gaussian\": \"" << hex(table[b >> 16])
        << "\", \"rademacher\": " << ((b >> 31) ? 1 : -1) << "}";
    }
    o << "]}";
  }
  o << "]}";
  std::cout << o.str() << std::endl;
  return 0;
}

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("config file '" + path + "' does not exist");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

}  // namespace

int print_step_bench(const std::string& pte, const std::string& data_path, const std::string& table_path,
                     const std::string& config_path, int steps, int threads) {
  RunConfig cfg = RunConfig::from_yaml(read_file(config_path));
  Program program(pte, threads);
  check_spec(cfg, ProgramSpec::load(pte), pte);
  ClientData data = ClientData::load(data_path);
  data.check(cfg);
  GaussianTable table(table_path);
  Trainer trainer(cfg, program, data, table);
  const auto seeds = step_seeds(cfg.spec, 1, uint64_t(data.partition()), 0);
  const auto rows = data.train_batch(1, 0);
  const std::vector<float> b0(size_t(program.num_params()), 0.0f);
  std::vector<double> ms;
  for (int i = 0; i <= steps; ++i) {
    std::vector<float> b = b0;
    auto t0 = std::chrono::steady_clock::now();
    trainer.step(b, seeds, rows);
    auto t1 = std::chrono::steady_clock::now();
    if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());  // i = 0: warm-up
  }
  std::sort(ms.begin(), ms.end());
  std::cout << "{\"min_ms\": " << number(ms.front()) << ", \"median_ms\": " << number(ms[ms.size() / 2])
            << ", \"peak_rss_mib\": " << number(peak_rss_mib()) << "}" << std::endl;
  return 0;
}

namespace {

std::string unbase64(const std::string& text) {
  std::string out(text.size() / 4 * 3 + 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(&out[0]), reinterpret_cast<const unsigned char*>(text.data()),
                          int(text.size()));
  if (n < 0) throw std::runtime_error("bad base64 in the messages file");
  size_t pad = 0;
  for (size_t i = text.size(); i > 0 && text[i - 1] == '='; --i) ++pad;
  out.resize(size_t(n) - pad);
  return out;
}

std::string record_json(const Record& r) {
  std::ostringstream o;
  o << "{";
  bool first = true;
  auto key = [&](const std::string& k) {
    o << (first ? "" : ", ") << json_quote(k) << ": ";
    first = false;
  };
  if (r.kind == Record::Kind::Config) {
    for (const auto& item : r.config.items()) {
      key(item.key());
      const auto& v = item.value();
      if (v.has_bytes()) {  // float32/uint32 words, as bit patterns
        std::vector<float> words(v.bytes().size() / 4);
        std::memcpy(words.data(), v.bytes().data(), words.size() * 4);
        o << list(words);
      } else if (v.has_sint64()) {
        o << v.sint64();
      } else if (v.has_double_()) {
        o << number(v.double_());
      } else {
        o << json_quote(v.string());
      }
    }
  } else {
    for (const auto& item : r.metric.items()) {
      key(item.key());
      o << (item.value().has_sint64() ? std::to_string(item.value().sint64()) : number(item.value().double_()));
    }
  }
  o << "}";
  return o.str();
}

}  // namespace

int print_replies(const std::string& messages_path, const std::string& pte, const std::string& data,
                  const std::string& table, const std::string& state, int threads) {
  Json messages = Json::parse(read_file(messages_path));
  Handlers handlers(ClientFiles{pte, data, table, state, threads});
  std::ostringstream o;
  o << "{\"replies\": [";
  for (size_t i = 0; i < messages.size(); ++i) {
    flwr::proto::ObjectTree tree;
    tree.ParseFromString(unbase64(messages[i]["tree"].str()));
    std::map<std::string, std::string> objects;
    for (const auto& m : messages[i]["objects"].members()) objects[m.first] = unbase64(m.second.str());
    Message msg = inflate_message(tree, objects);
    o << (i ? ", " : "") << "{";
    try {
      RecordDict reply = handlers.handle(msg);
      for (size_t k = 0; k < reply.size(); ++k) o << (k ? ", " : "") << json_quote(reply[k].first) << ": " << record_json(reply[k].second);
    } catch (const std::exception& e) {
      o << "\"error\": " << json_quote(e.what());
    }
    o << "}";
  }
  NodeState s = NodeState::load(state);
  o << "], \"synced\": " << s.synced << ", \"global_b\": " << list(s.global_b) << ", \"personal_b\": " << list(s.personal_b) << "}";
  std::cout << o.str() << std::endl;
  return 0;
}

int print_train_check(const std::string& pte, const std::string& data_path, const std::string& table_path,
                      const std::string& config_path, long long round, int threads) {
  RunConfig cfg = RunConfig::from_yaml(read_file(config_path));
  Program program(pte, threads);
  check_spec(cfg, ProgramSpec::load(pte), pte);
  ClientData data = ClientData::load(data_path);
  data.check(cfg);
  GaussianTable table(table_path);
  Trainer trainer(cfg, program, data, table);
  TrainResult res = trainer.train(std::vector<float>(size_t(program.num_params()), 0.0f), round);
  std::vector<uint32_t> seeds = step_seeds(cfg.spec, uint64_t(round), uint64_t(data.partition()), 0);
  std::vector<float> in_program = program.directions(seeds), host, z;
  for (uint32_t s : seeds) {
    direction(s, size_t(program.num_params()), cfg.zo.gaussian, table, z);
    host.insert(host.end(), z.begin(), z.end());
  }
  std::ostringstream o;
  o << "{\"partition\": " << data.partition() << ", \"round\": " << round << ", \"losses\": [";
  for (size_t i = 0; i < res.steps.size(); ++i) o << (i ? ", " : "") << list(res.steps[i].losses);
  o << "], \"grads\": " << list(res.projected_grads) << ", \"b\": " << list(res.b) << ", \"loss\": " << number(res.loss)
    << ", \"directions_equal\": " << (in_program == host ? "true" : "false") << ", \"metrics\": {";
  bool first = true;
  for (const auto& [method, p] : trainer.personalize(cfg.yaml.list("eval.personalization"), std::vector<float>(res.b.size(), 0.0f), &res.b)) {
    for (const auto& [k, v] : trainer.evaluate(p.b, data.test())) {
      o << (first ? "" : ", ") << "\"" << method << "_" << k << "\": " << number(v);
      first = false;
    }
    for (const auto& [k, v] : p.chosen) {
      o << (first ? "" : ", ") << "\"" << method << "_" << k << "\": " << number(v);
      first = false;
    }
  }
  o << "}}";
  std::cout << o.str() << std::endl;
  return 0;
}

}  // namespace fedprge

#include "state.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "json.h"

namespace fedprge {

namespace {
const char* kMagic = "fedprge-client-state/1";
}

NodeState NodeState::load(const std::string& path) {
  NodeState s;
  std::ifstream f(path, std::ios::binary);
  if (!f) return s;
  std::string header;
  std::getline(f, header);
  try {
    Json h = Json::parse(header);
    if (h["format"].str() != kMagic) throw std::runtime_error("wrong format tag");
    s.run_id = uint64_t(std::stoull(h["run_id"].str()));
    s.node_id = uint64_t(std::stoull(h["node_id"].str()));
    s.config_yaml = h["config"].str();
    s.synced = h["synced"].integer();
    s.global_b.resize(size_t(h["global"].integer()));
    s.personal_b.resize(size_t(h["personal"].integer()));
  } catch (const std::exception& e) {
    throw std::runtime_error("state file '" + path + "' is damaged (" + e.what() + "); delete it to start afresh");
  }
  f.read(reinterpret_cast<char*>(s.global_b.data()), std::streamsize(s.global_b.size() * 4));
  f.read(reinterpret_cast<char*>(s.personal_b.data()), std::streamsize(s.personal_b.size() * 4));
  if (!f) throw std::runtime_error("state file '" + path + "' is truncated; delete it to start afresh");
  return s;
}

void NodeState::save(const std::string& path) const {
  std::string header = std::string("{\"format\": \"") + kMagic + "\", \"run_id\": \"" + std::to_string(run_id) +
                       "\", \"node_id\": \"" + std::to_string(node_id) + "\", \"synced\": " + std::to_string(synced) + ", \"global\": " + std::to_string(global_b.size()) +
                       ", \"personal\": " + std::to_string(personal_b.size()) + ", \"config\": " + json_quote(config_yaml) +
                       "}\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write state file '" + tmp + "'");
    f << header;
    f.write(reinterpret_cast<const char*>(global_b.data()), std::streamsize(global_b.size() * 4));
    f.write(reinterpret_cast<const char*>(personal_b.data()), std::streamsize(personal_b.size() * 4));
    if (!f.flush()) throw std::runtime_error("cannot write state file '" + tmp + "'");
  }
  int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot replace state file '" + path + "'");
}

}  // namespace fedprge

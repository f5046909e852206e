// The YAML a fedprge server sends (OmegaConf.to_yaml of the run config): nested block mappings, scalars, block
// or flow lists of scalars. Read into dotted keys ("zo.q" -> "4"); anything else is refused, naming the line.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace fedprge {

struct FlatYaml {
  std::map<std::string, std::string> scalars;             // unquoted scalar text; null is "null"
  std::map<std::string, std::vector<std::string>> lists;  // lists of scalars

  static FlatYaml parse(const std::string& text);
  bool has(const std::string& key) const { return scalars.count(key) > 0; }
  const std::string& get(const std::string& key) const;  // throws naming the key
  std::string get(const std::string& key, const std::string& fallback) const;
  double number(const std::string& key) const;
  long long integer(const std::string& key) const;
  bool boolean(const std::string& key) const;
  const std::vector<std::string>& list(const std::string& key) const;
};

}  // namespace fedprge

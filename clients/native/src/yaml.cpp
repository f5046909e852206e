#include "yaml.h"

#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace fedprge {

namespace {

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r"), b = s.find_last_not_of(" \t\r");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

std::string unquote(const std::string& raw) {
  std::string s = trim(raw);
  if (s.size() >= 2 && s.front() == '\'' && s.back() == '\'') {
    std::string out;
    for (size_t i = 1; i + 1 < s.size(); ++i) {
      out += s[i];
      if (s[i] == '\'' && s[i + 1] == '\'') ++i;  // '' is a quote inside single quotes
    }
    return out;
  }
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') return s.substr(1, s.size() - 2);
  return s;
}

std::vector<std::string> flow_list(const std::string& s) {
  std::vector<std::string> out;
  std::string inner = trim(s.substr(1, s.size() - 2)), item;
  if (inner.empty()) return out;
  std::stringstream ss(inner);
  while (std::getline(ss, item, ',')) out.push_back(unquote(item));
  return out;
}

}  // namespace

FlatYaml FlatYaml::parse(const std::string& text) {
  FlatYaml y;
  std::vector<std::pair<int, std::string>> stack;  // (indent, key path) of open mappings
  std::string list_key;
  int list_indent = -1;
  std::stringstream in(text);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    std::string body = trim(line);
    if (body.empty() || body[0] == '#') continue;
    int indent = int(line.find_first_not_of(' '));
    if (body.rfind("- ", 0) == 0 || body == "-") {
      if (list_key.empty() || indent < list_indent - 2) {
        throw std::runtime_error("config YAML line " + std::to_string(number) + ": a list item outside a list");
      }
      y.lists[list_key].push_back(unquote(body.substr(1)));
      continue;
    }
    list_key.clear();
    while (!stack.empty() && stack.back().first >= indent) stack.pop_back();
    size_t colon = body.find(':');
    if (colon == std::string::npos) {
      throw std::runtime_error("config YAML line " + std::to_string(number) + " is not 'key: value': " + body);
    }
    std::string key = unquote(body.substr(0, colon));
    std::string path = stack.empty() ? key : stack.back().second + "." + key;
    std::string value = trim(body.substr(colon + 1));
    if (value.empty()) {  // a nested mapping or a block list follows
      stack.emplace_back(indent, path);
      list_key = path;
      list_indent = indent + 2;
      y.lists[path];  // an empty list unless items follow
      continue;
    }
    if (value.front() == '[' && value.back() == ']') {
      y.lists[path] = flow_list(value);
    } else if (value == "{}") {
      y.scalars[path] = "{}";
    } else {
      y.scalars[path] = unquote(value);
    }
  }
  return y;
}

const std::string& FlatYaml::get(const std::string& key) const {
  auto it = scalars.find(key);
  if (it == scalars.end()) throw std::runtime_error("the run config has no '" + key + "'");
  return it->second;
}

std::string FlatYaml::get(const std::string& key, const std::string& fallback) const {
  auto it = scalars.find(key);
  return it == scalars.end() ? fallback : it->second;
}

double FlatYaml::number(const std::string& key) const {
  const std::string& v = get(key);
  char* end = nullptr;
  double d = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end) throw std::runtime_error("config " + key + "=" + v + " is not a number");
  return d;
}

long long FlatYaml::integer(const std::string& key) const {
  const std::string& v = get(key);
  char* end = nullptr;
  long long i = std::strtoll(v.c_str(), &end, 10);
  if (end == v.c_str() || *end) throw std::runtime_error("config " + key + "=" + v + " is not an integer");
  return i;
}

bool FlatYaml::boolean(const std::string& key) const {
  const std::string& v = get(key);
  if (v == "true") return true;
  if (v == "false") return false;
  throw std::runtime_error("config " + key + "=" + v + " is not true/false");
}

const std::vector<std::string>& FlatYaml::list(const std::string& key) const {
  auto it = lists.find(key);
  if (it == lists.end()) throw std::runtime_error("the run config has no list '" + key + "'");
  return it->second;
}

}  // namespace fedprge

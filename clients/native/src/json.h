// A small JSON reader (objects, arrays, strings, numbers, true/false/null) and string quoting for writers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fedprge {

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  static Json parse(const std::string& text);  // throws std::runtime_error with the offset of the problem

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool has(const std::string& key) const;
  const Json& operator[](const std::string& key) const;  // throws naming the missing key
  const Json& operator[](size_t i) const { return items_.at(i); }
  size_t size() const { return kind_ == Kind::Object ? members_.size() : items_.size(); }
  const std::vector<Json>& items() const { return items_; }
  const std::vector<std::pair<std::string, Json>>& members() const { return members_; }

  double number() const;
  int64_t integer() const;
  bool boolean() const;
  const std::string& str() const;
  std::string text() const { return text_; }  // the number's literal or the string

 private:
  friend class JsonParser;
  Kind kind_ = Kind::Null;
  bool bool_ = false;
  std::string text_;
  std::vector<Json> items_;
  std::vector<std::pair<std::string, Json>> members_;  // in document order
};

std::string json_quote(const std::string& s);

}  // namespace fedprge

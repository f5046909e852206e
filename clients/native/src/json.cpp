#include "json.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace fedprge {

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}

  Json value() {
    skip();
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    Json v;
    if (c == '{') {
      v.kind_ = Json::Kind::Object;
      ++i_;
      skip();
      if (peek('}')) return ++i_, v;
      for (;;) {
        skip();
        std::string key = string();
        skip();
        expect(':');
        v.members_.emplace_back(key, value());
        skip();
        if (peek(',')) { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind_ = Json::Kind::Array;
      ++i_;
      skip();
      if (peek(']')) return ++i_, v;
      for (;;) {
        v.items_.push_back(value());
        skip();
        if (peek(',')) { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind_ = Json::Kind::String;
      v.text_ = string();
      return v;
    }
    if (word("true")) { v.kind_ = Json::Kind::Bool; v.bool_ = true; return v; }
    if (word("false")) { v.kind_ = Json::Kind::Bool; return v; }
    if (word("null")) return v;
    size_t start = i_;
    while (i_ < s_.size() && std::string("+-0123456789.eE").find(s_[i_]) != std::string::npos) ++i_;
    if (start == i_) fail("unexpected character");
    v.kind_ = Json::Kind::Number;
    v.text_ = s_.substr(start, i_ - start);
    return v;
  }

  void end() {
    skip();
    if (i_ != s_.size()) fail("trailing characters");
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("bad JSON at offset " + std::to_string(i_) + ": " + what);
  }
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  bool peek(char c) const { return i_ < s_.size() && s_[i_] == c; }
  void expect(char c) {
    if (!peek(c)) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool word(const char* w) {
    std::string ws(w);
    if (s_.compare(i_, ws.size(), ws) != 0) return false;
    i_ += ws.size();
    return true;
  }
  void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned cp = std::stoul(s_.substr(i_, 4), nullptr, 16);
    i_ += 4;
    return cp;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("bad escape");
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: out += e;
      }
    }
    expect('"');
    return out;
  }

  const std::string& s_;
  size_t i_ = 0;
};

Json Json::parse(const std::string& text) {
  JsonParser p(text);
  Json v = p.value();
  p.end();
  return v;
}

bool Json::has(const std::string& key) const {
  for (const auto& m : members_)
    if (m.first == key) return true;
  return false;
}

const Json& Json::operator[](const std::string& key) const {
  for (const auto& m : members_)
    if (m.first == key) return m.second;
  throw std::runtime_error("JSON object has no key '" + key + "'");
}

double Json::number() const {
  if (kind_ != Kind::Number) throw std::runtime_error("JSON value is not a number");
  return std::strtod(text_.c_str(), nullptr);
}

int64_t Json::integer() const {
  if (kind_ != Kind::Number || text_.find_first_of(".eE") != std::string::npos)
    throw std::runtime_error("JSON value " + text_ + " is not an integer");
  return std::strtoll(text_.c_str(), nullptr, 10);
}

bool Json::boolean() const {
  if (kind_ != Kind::Bool) throw std::runtime_error("JSON value is not true/false");
  return bool_;
}

const std::string& Json::str() const {
  if (kind_ != Kind::String) throw std::runtime_error("JSON value is not a string");
  return text_;
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

}  // namespace fedprge

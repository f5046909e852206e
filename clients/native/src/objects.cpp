#include "objects.h"

#include <openssl/sha.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "json.h"

namespace fedprge {

namespace {

struct Parsed {
  std::string type;
  std::vector<std::string> children;
  std::string body;
};

Parsed parse_object(const std::string& id, const std::string& content) {
  size_t nul = content.find('\0');
  if (nul == std::string::npos) throw std::runtime_error("object " + id + " has no header");
  std::string head = content.substr(0, nul);
  size_t a = head.find(' '), b = head.rfind(' ');
  if (a == std::string::npos || a == b) throw std::runtime_error("object " + id + " has a bad header '" + head + "'");
  Parsed p;
  p.type = head.substr(0, a);
  std::string kids = head.substr(a + 1, b - a - 1);
  for (size_t start = 0; !kids.empty() && start <= kids.size();) {
    size_t comma = kids.find(',', start);
    p.children.push_back(kids.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  p.body = content.substr(nul + 1);
  if (std::to_string(p.body.size()) != head.substr(b + 1)) throw std::runtime_error("object " + id + " has a wrong body length");
  return p;
}

const std::string& object(const std::map<std::string, std::string>& objects, const std::string& id) {
  auto it = objects.find(id);
  if (it == objects.end()) throw std::runtime_error("object " + id + " was not pulled");
  return it->second;
}

std::string with_header(const std::string& type, const std::vector<std::string>& children, const std::string& body) {
  std::string head = type + " ";
  for (size_t i = 0; i < children.size(); ++i) head += (i ? "," : "") + children[i];
  head += " " + std::to_string(body.size());
  std::string out = head;
  out.push_back('\0');
  return out + body;
}

ArrayValue inflate_array(const std::string& id, const std::map<std::string, std::string>& objects) {
  Parsed p = parse_object(id, object(objects, id));
  if (p.type != "Array") throw std::runtime_error("object " + id + " is a " + p.type + ", not an Array");
  Json meta = Json::parse(p.body);
  ArrayValue a;
  a.dtype = meta["dtype"].str();
  a.stype = meta["stype"].str();
  for (const Json& s : meta["shape"].items()) a.shape.push_back(s.integer());
  for (const Json& k : meta["arraychunk_ids"].items()) {
    const std::string& chunk_id = p.children.at(size_t(k.integer()));
    Parsed c = parse_object(chunk_id, object(objects, chunk_id));
    a.data += c.body;
  }
  return a;
}

Record inflate_record(const std::string& id, const std::map<std::string, std::string>& objects) {
  Parsed p = parse_object(id, object(objects, id));
  Record r;
  if (p.type == "ConfigRecord") {
    r.kind = Record::Kind::Config;
    if (!r.config.ParseFromString(p.body)) throw std::runtime_error("ConfigRecord " + id + " does not parse");
  } else if (p.type == "MetricRecord") {
    r.kind = Record::Kind::Metric;
    if (!r.metric.ParseFromString(p.body)) throw std::runtime_error("MetricRecord " + id + " does not parse");
  } else if (p.type == "ArrayRecord") {
    r.kind = Record::Kind::Array;
    const Json refs = Json::parse(p.body);
    for (const auto& m : refs.members()) r.arrays.emplace_back(m.first, inflate_array(m.second.str(), objects));
  } else {
    throw std::runtime_error("object " + id + " is a " + p.type + ", not a record");
  }
  return r;
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  unsigned char d[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), d);
  char hex[2 * SHA256_DIGEST_LENGTH + 1];
  for (int i = 0; i < SHA256_DIGEST_LENGTH; ++i) std::snprintf(hex + 2 * i, 3, "%02x", d[i]);
  return std::string(hex, 2 * SHA256_DIGEST_LENGTH);
}

double unix_now() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count() / 1e6;
}

std::vector<float> ArrayValue::float32() const {
  if (dtype != "float32" || stype != "numpy.ndarray") {
    throw std::runtime_error("array has dtype " + dtype + " and stype " + stype + ", not a float32 NumPy array");
  }
  // .npy: magic, version, header length (u16 for 1.0, u32 for 2.0/3.0), header, then the little-endian data
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error("array data is not a .npy file");
  size_t header = data[6] == 1 ? 10 + (uint8_t(data[8]) | uint8_t(data[9]) << 8)
                               : 12 + (uint8_t(data[8]) | uint8_t(data[9]) << 8 | uint8_t(data[10]) << 16 | uint32_t(uint8_t(data[11])) << 24);
  std::string dict = data.substr(0, header);
  if (dict.find("'<f4'") == std::string::npos || dict.find("'fortran_order': False") == std::string::npos) {
    throw std::runtime_error("array is not a little-endian C-order float32 .npy");
  }
  size_t n = 1;
  for (int64_t s : shape) n *= size_t(s);
  if (data.size() - header != n * 4) throw std::runtime_error("array data has " + std::to_string(data.size() - header) + " bytes for " + std::to_string(n) + " floats");
  std::vector<float> out(n);
  std::memcpy(out.data(), data.data() + header, n * 4);
  return out;
}

Message inflate_message(const flwr::proto::ObjectTree& tree, const std::map<std::string, std::string>& objects) {
  Parsed p = parse_object(tree.object_id(), object(objects, tree.object_id()));
  if (p.type != "Message") throw std::runtime_error("object " + tree.object_id() + " is a " + p.type + ", not a Message");
  flwr::proto::Message proto;
  if (!proto.ParseFromString(p.body)) throw std::runtime_error("Message " + tree.object_id() + " does not parse");
  Message m;
  m.metadata = proto.metadata();
  m.metadata.set_message_id(tree.object_id());
  if (proto.has_error()) {
    m.has_error = true;
    m.error = proto.error();
    return m;
  }
  if (p.children.size() != 1) throw std::runtime_error("Message " + tree.object_id() + " has no content");
  Parsed rd = parse_object(p.children[0], object(objects, p.children[0]));
  if (rd.type != "RecordDict") throw std::runtime_error("object " + p.children[0] + " is not a RecordDict");
  const Json refs = Json::parse(rd.body);
  for (const auto& member : refs.members()) {
    m.content.emplace_back(member.first, inflate_record(member.second.str(), objects));
  }
  return m;
}

flwr::proto::Metadata reply_metadata(const flwr::proto::Metadata& ins, double now) {
  flwr::proto::Metadata r;
  r.set_run_id(ins.run_id());
  r.set_src_node_id(ins.dst_node_id());
  r.set_dst_node_id(ins.src_node_id());
  r.set_reply_to_message_id(ins.message_id());
  r.set_group_id(ins.group_id());
  r.set_created_at(now);
  r.set_ttl(ins.created_at() + ins.ttl() - now);
  r.set_message_type(ins.message_type());
  if (ins.has_dst_task_id()) r.set_src_task_id(ins.dst_task_id());
  if (ins.has_src_task_id()) r.set_dst_task_id(ins.src_task_id());
  return r;
}

Deflated deflate_message(const Message& msg) {
  Deflated out;
  flwr::proto::ObjectTree message_tree;
  std::vector<std::string> message_children;
  if (!msg.has_error) {
    std::string refs = "{";
    std::vector<std::string> record_ids;
    flwr::proto::ObjectTree rd_tree;
    for (size_t i = 0; i < msg.content.size(); ++i) {
      const Record& r = msg.content[i].second;
      std::string body, type;
      if (r.kind == Record::Kind::Config) {
        type = "ConfigRecord";
        r.config.SerializeToString(&body);
      } else if (r.kind == Record::Kind::Metric) {
        type = "MetricRecord";
        r.metric.SerializeToString(&body);
      } else {
        throw std::runtime_error("sending an ArrayRecord is not implemented");
      }
      std::string content = with_header(type, {}, body), id = sha256_hex(content);
      if (!out.objects.count(id)) {
        out.objects[id] = content;
        record_ids.push_back(id);
        rd_tree.add_children()->set_object_id(id);
      }
      refs += (i ? ", " : "") + json_quote(msg.content[i].first) + ": " + json_quote(id);
    }
    refs += "}";
    std::string rd = with_header("RecordDict", record_ids, refs), rd_id = sha256_hex(rd);
    out.objects[rd_id] = rd;
    rd_tree.set_object_id(rd_id);
    *message_tree.add_children() = rd_tree;
    message_children.push_back(rd_id);
  }
  flwr::proto::Message body;
  *body.mutable_metadata() = msg.metadata;
  body.mutable_metadata()->set_message_id("");
  if (msg.has_error) *body.mutable_error() = msg.error;
  std::string serialized;
  body.SerializeToString(&serialized);
  std::string content = with_header("Message", message_children, serialized), id = sha256_hex(content);
  out.objects[id] = content;
  message_tree.set_object_id(id);
  out.tree = message_tree;
  *out.message.mutable_metadata() = msg.metadata;
  out.message.mutable_metadata()->set_message_id(id);
  if (msg.has_error) {
    *out.message.mutable_error() = msg.error;
  } else {
    out.message.mutable_content();  // an empty RecordDict: the content travels as objects
  }
  return out;
}

const Record* find_record(const RecordDict& rd, const std::string& name) {
  for (const auto& kv : rd)
    if (kv.first == name) return &kv.second;
  return nullptr;
}

const flwr::proto::ConfigRecordValue& config_field(const RecordDict& rd, const std::string& record, const std::string& key) {
  const Record* r = find_record(rd, record);
  if (!r || r->kind != Record::Kind::Config) throw std::runtime_error("the message has no ConfigRecord '" + record + "'");
  for (const auto& item : r->config.items())
    if (item.key() == key) return item.value();
  throw std::runtime_error("the " + record + " record has no field '" + key + "'");
}

int64_t config_int(const RecordDict& rd, const std::string& record, const std::string& key) {
  const auto& v = config_field(rd, record, key);
  if (v.has_sint64()) return v.sint64();
  if (v.has_uint64()) return int64_t(v.uint64());
  throw std::runtime_error("the " + record + " record's '" + key + "' is not an integer");
}

std::string config_string(const RecordDict& rd, const std::string& record, const std::string& key) {
  const auto& v = config_field(rd, record, key);
  if (!v.has_string()) throw std::runtime_error("the " + record + " record's '" + key + "' is not a string");
  return v.string();
}

}  // namespace fedprge

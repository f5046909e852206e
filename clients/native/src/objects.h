// Flower's message objects as they cross the Fleet API: "<Type> <child ids> <body length>\0<body>", each named
// by the SHA-256 of those bytes. A Message's body is a protobuf Message (metadata, error), its child a RecordDict
// (JSON {name: record id}); ConfigRecord/MetricRecord bodies are protobuf; an ArrayRecord is JSON {name: array id},
// an Array JSON metadata whose ArrayChunks hold the bytes (a .npy file for NumPy arrays).
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "flwr/proto/message.pb.h"
#include "flwr/proto/recorddict.pb.h"

namespace fedprge {

struct ArrayValue {
  std::string dtype, stype;
  std::vector<int64_t> shape;
  std::string data;
  std::vector<float> float32() const;  // the values of a float32 NumPy array; throws naming what is wrong
};

struct Record {
  enum class Kind { Config, Metric, Array } kind = Kind::Config;
  flwr::proto::ConfigRecord config;
  flwr::proto::MetricRecord metric;
  std::vector<std::pair<std::string, ArrayValue>> arrays;
};

using RecordDict = std::vector<std::pair<std::string, Record>>;

struct Message {
  flwr::proto::Metadata metadata;
  bool has_error = false;
  flwr::proto::Error error;
  RecordDict content;
};

// A Message rebuilt from its object tree and the pulled contents of every object (id -> bytes).
Message inflate_message(const flwr::proto::ObjectTree& tree, const std::map<std::string, std::string>& objects);

// A reply's objects: id -> content, the tree, and the Message proto to push (content emptied, message_id set).
struct Deflated {
  std::map<std::string, std::string> objects;
  flwr::proto::ObjectTree tree;
  flwr::proto::Message message;
};
Deflated deflate_message(const Message& msg);

// The reply metadata of Message(..., reply_to=msg): ids swapped, ttl limited to what the instruction has left.
flwr::proto::Metadata reply_metadata(const flwr::proto::Metadata& ins, double now);

std::string sha256_hex(const std::string& bytes);
double unix_now();

// Typed access to a ConfigRecord field; each throws one line naming the record and the field.
const flwr::proto::ConfigRecordValue& config_field(const RecordDict& rd, const std::string& record, const std::string& key);
const Record* find_record(const RecordDict& rd, const std::string& name);
int64_t config_int(const RecordDict& rd, const std::string& record, const std::string& key);
std::string config_string(const RecordDict& rd, const std::string& record, const std::string& key);

}  // namespace fedprge

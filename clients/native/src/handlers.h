// The fedprge protocol on a native client (fedprge/federation/client_app.py): `query` (registration), `train` and
// `evaluate`, from the records of a received message to the records of its reply, with the node's state kept in a
// file. What the client cannot do raises std::runtime_error (answered with a Flower error reply); what makes it
// useless for this run (a program or data file that does not match) raises SetupError.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include "client_data.h"
#include "objects.h"
#include "program.h"
#include "rng.h"
#include "run_config.h"
#include "state.h"
#include "trainer.h"

namespace fedprge {

class SetupError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ClientFiles {
  std::string pte, data, table, state;
  int threads = 1;
};

class Handlers {
 public:
  // Loads the program, the data and the direction table (each error names its file).
  explicit Handlers(const ClientFiles& files);

  // The reply content of `msg` (query, train or evaluate).
  RecordDict handle(const Message& msg);

  const ClientData& data() const { return data_; }
  // The node id of the last session (from the state file) and the new one, remembered at activation.
  uint64_t last_node_id() const { return state_.node_id; }
  void remember_node_id(uint64_t id);
  Program& program() { return program_; }
  const GaussianTable& table() const { return table_; }

 private:
  RecordDict query(const Message& msg);
  RecordDict train(const Message& msg);
  RecordDict evaluate(const Message& msg);
  void setup(uint64_t run_id);                                // config, checks and trainer of the stored run
  std::vector<float> sync_global(const Message& msg, bool keep);  // client_app.sync_global

  ClientFiles files_;
  Program program_;
  ClientData data_;
  GaussianTable table_;
  NodeState state_;
  std::unique_ptr<RunConfig> cfg_;
  std::unique_ptr<Trainer> trainer_;
};

}  // namespace fedprge

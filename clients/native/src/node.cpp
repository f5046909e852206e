#include "node.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

namespace fedprge {

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

void log(const std::string& line) { std::cerr << "fedprge-client: " << line << std::endl; }

// Heartbeats from their own connection, every ~0.7-0.9 x (interval - 5 s), as Flower's SuperNode sends them.
class Heartbeat {
 public:
  Heartbeat(const NodeOptions& o, const NodeKey& key, uint64_t node_id)
      : options_(o), fleet_(o.endpoint, key, 5.0), node_id_(node_id), thread_([this] { loop(); }) {}
  ~Heartbeat() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void loop() {
    std::mt19937 rng(std::random_device{}());
    std::unique_lock<std::mutex> lock(mu_);
    while (!done_) {
      lock.unlock();
      try {
        flwr::proto::SendNodeHeartbeatRequest req;
        req.mutable_node()->set_node_id(node_id_);
        req.set_heartbeat_interval(options_.heartbeat_interval);
        flwr::proto::SendNodeHeartbeatResponse res;
        fleet_.call("send-node-heartbeat", req, res);
        if (!res.success()) log("heartbeat: the SuperLink does not recognise this node");
      } catch (const FleetError& e) {
        log(std::string("heartbeat failed (will retry): ") + e.what());
      }
      double base = std::max(1.0, options_.heartbeat_interval - 5.0);
      double wait = base * std::uniform_real_distribution<double>(0.7, 0.9)(rng);
      lock.lock();
      cv_.wait_for(lock, std::chrono::duration<double>(wait), [this] { return done_; });
    }
  }

  const NodeOptions& options_;
  Fleet fleet_;
  uint64_t node_id_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

struct Received {
  Message message;
  double received_at = 0;
};

class Session {
 public:
  Session(const NodeOptions& o, const NodeKey& key, uint64_t node_id) : o_(o), fleet_(o.endpoint, key, 60.0), node_id_(node_id) {}

  template <typename Fn>
  void retry(const std::string& what, Fn fn) {
    with_retry(what, o_.endpoint, o_.max_wait, fn, [] { return g_stop.load(); });
  }

  bool pull(Received& out) {
    flwr::proto::PullMessagesRequest req;
    req.mutable_node()->set_node_id(node_id_);
    flwr::proto::PullMessagesResponse res;
    retry("pull-messages", [&] { fleet_.call("pull-messages", req, res); });
    if (res.messages_list_size() == 0) return false;
    const flwr::proto::Message& head = res.messages_list(0);
    const flwr::proto::ObjectTree& tree = res.message_object_trees(0);
    const uint64_t run_id = head.metadata().run_id();
    std::map<std::string, std::string> objects;
    pull_tree(tree, run_id, objects);
    flwr::proto::ConfirmMessageReceivedRequest confirm;
    confirm.mutable_node()->set_node_id(node_id_);
    confirm.set_run_id(run_id);
    confirm.set_message_object_id(tree.object_id());
    flwr::proto::ConfirmMessageReceivedResponse ok;
    retry("confirm-message-received", [&] { fleet_.call("confirm-message-received", confirm, ok); });
    out.message = inflate_message(tree, objects);
    out.message.metadata.set_message_id(head.metadata().message_id().empty() ? tree.object_id() : head.metadata().message_id());
    out.received_at = unix_now();
    return true;
  }

  void push(const Message& reply, double runtime_s) {
    Deflated d = deflate_message(reply);
    flwr::proto::PushMessagesRequest req;
    req.mutable_node()->set_node_id(node_id_);
    *req.add_messages_list() = d.message;
    *req.add_message_object_trees() = d.tree;
    req.add_clientapp_runtime_list(runtime_s);
    flwr::proto::PushMessagesResponse res;
    retry("push-messages", [&] { fleet_.call("push-messages", req, res); });
    for (const std::string& id : res.objects_to_push()) {
      auto it = d.objects.find(id);
      if (it == d.objects.end()) throw std::runtime_error("the SuperLink asked for object " + id + ", not part of the reply");
      flwr::proto::PushObjectRequest obj;
      obj.mutable_node()->set_node_id(node_id_);
      obj.set_run_id(reply.metadata.run_id());
      obj.set_object_id(id);
      obj.set_object_content(it->second);
      obj.set_session_id(res.session_id());
      flwr::proto::PushObjectResponse stored;
      retry("push-object", [&] { fleet_.call("push-object", obj, stored); });
      if (!stored.stored()) throw std::runtime_error("the SuperLink did not store object " + id);
    }
  }

 private:
  void pull_tree(const flwr::proto::ObjectTree& tree, uint64_t run_id, std::map<std::string, std::string>& objects) {
    for (const auto& child : tree.children()) pull_tree(child, run_id, objects);
    if (objects.count(tree.object_id())) return;
    flwr::proto::PullObjectRequest req;
    req.mutable_node()->set_node_id(node_id_);
    req.set_run_id(run_id);
    req.set_object_id(tree.object_id());
    for (int attempt = 0;; ++attempt) {
      flwr::proto::PullObjectResponse res;
      retry("pull-object", [&] { fleet_.call("pull-object", req, res); });
      if (!res.object_found()) throw std::runtime_error("object " + tree.object_id() + " was not found on the SuperLink");
      if (res.object_available()) {
        if (sha256_hex(res.object_content()) != tree.object_id()) throw std::runtime_error("object " + tree.object_id() + " arrived damaged");
        objects[tree.object_id()] = res.object_content();
        return;
      }
      if (attempt > 600 || g_stop) throw std::runtime_error("object " + tree.object_id() + " never became available");
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  const NodeOptions& o_;
  Fleet fleet_;
  uint64_t node_id_;
};

}  // namespace

int run_node(const NodeOptions& o, Handlers& handlers) {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const bool self_registered = o.key.empty();
  NodeKey key = self_registered ? NodeKey::generate() : NodeKey::load(o.key);
  Fleet fleet(o.endpoint, key, 30.0);
  auto retry = [&](const std::string& what, const std::function<void()>& fn) {
    with_retry(what, o.endpoint, o.max_wait, fn, [] { return g_stop.load(); });
  };
  if (self_registered) {
    flwr::proto::RegisterNodeFleetRequest req;
    req.set_public_key(key.public_pem());
    flwr::proto::RegisterNodeFleetResponse res;
    retry("register-node", [&] { fleet.call("register-node", req, res); });
  }
  if (!self_registered && handlers.last_node_id() != 0) {
    // A restarted client: end the session it was killed in, or the SuperLink refuses to activate the node again
    // until that session's heartbeats expire.
    try {
      flwr::proto::DeactivateNodeRequest req;
      req.set_node_id(handlers.last_node_id());
      flwr::proto::DeactivateNodeResponse res;
      fleet.call("deactivate-node", req, res);
      log("ended the previous session of node " + std::to_string(handlers.last_node_id()));
    } catch (const FleetError&) {
    }
  }
  flwr::proto::ActivateNodeRequest act;
  act.set_public_key(key.public_pem());
  act.set_heartbeat_interval(o.heartbeat_interval);
  flwr::proto::ActivateNodeResponse activated;
  try {
    retry("activate-node", [&] { fleet.call("activate-node", act, activated); });
  } catch (const Refused& e) {
    std::string why = e.what();
    if (!self_registered) {
      throw std::runtime_error("the SuperLink at " + o.endpoint.address + " refused this node's key '" + o.key +
                               "' (is its public key registered with `flwr supernode register`?): " + why);
    }
    throw;
  }
  const uint64_t node_id = activated.node_id();
  handlers.remember_node_id(node_id);
  log("activated as node " + std::to_string(node_id) + " at " + o.endpoint.address + " (partition " +
      std::to_string(handlers.data().partition()) + ", P=" + std::to_string(handlers.program().num_params()) + ")");
  int code = 0;
  {
    Heartbeat heartbeat(o, key, node_id);
    Session session(o, key, node_id);
    while (!g_stop) {
      Received in;
      try {
        if (!session.pull(in)) {
          std::this_thread::sleep_for(std::chrono::duration<double>(o.poll));
          continue;
        }
      } catch (const Unreachable&) {
        if (g_stop) break;
        throw;
      } catch (const Refused&) {
        if (g_stop) break;
        throw;
      } catch (const std::exception& e) {  // e.g. an object that never arrived: drop the message, go on
        if (g_stop) break;
        log(std::string("could not receive a message: ") + e.what());
        std::this_thread::sleep_for(std::chrono::duration<double>(o.poll));
        continue;
      }
      const Message& msg = in.message;
      log("round " + (msg.metadata.group_id().empty() ? std::string("-") : msg.metadata.group_id()) + ": " +
          msg.metadata.message_type() + " message received");
      Message reply;  // Message(content or error, reply_to=msg): its metadata is stamped when it is sent
      bool fatal = false;
      std::string fatal_reason;
      try {
        reply.content = handlers.handle(msg);
      } catch (const SetupError& e) {
        reply.has_error = true;
        reply.error.set_code(2);
        reply.error.set_reason(e.what());
        fatal = true;
        fatal_reason = e.what();
      } catch (const std::exception& e) {
        reply.has_error = true;
        reply.error.set_code(2);  // CLIENT_APP_RAISED_EXCEPTION
        reply.error.set_reason(e.what());
        log("round " + msg.metadata.group_id() + ": " + msg.metadata.message_type() + " failed: " + e.what());
      }
      reply.metadata = reply_metadata(msg.metadata, unix_now());
      try {
        session.push(reply, unix_now() - in.received_at);
      } catch (const Unreachable&) {
        throw;
      } catch (const Refused&) {
        throw;
      } catch (const std::exception& e) {  // e.g. the run has ended: the reply is not wanted any more
        log("round " + msg.metadata.group_id() + ": could not send the reply: " + e.what());
        if (!fatal) continue;
      }
      log("round " + (msg.metadata.group_id().empty() ? std::string("-") : msg.metadata.group_id()) + ": " +
          msg.metadata.message_type() + (reply.has_error ? " error reply sent" : " reply sent") + " in " +
          std::to_string(unix_now() - in.received_at).substr(0, 5) + " s");
      if (fatal) {
        std::cerr << "fedprge-client: " << fatal_reason << std::endl;
        code = 2;
        break;
      }
    }
  }
  try {
    flwr::proto::DeactivateNodeRequest req;
    req.set_node_id(node_id);
    flwr::proto::DeactivateNodeResponse res;
    fleet.call("deactivate-node", req, res);
    if (self_registered) {
      flwr::proto::UnregisterNodeFleetRequest ureq;
      ureq.set_node_id(node_id);
      flwr::proto::UnregisterNodeFleetResponse ures;
      fleet.call("unregister-node", ureq, ures);
    }
  } catch (const std::exception&) {
  }
  log(code ? "stopped after a setup error" : "stopped");
  return code;
}

}  // namespace fedprge

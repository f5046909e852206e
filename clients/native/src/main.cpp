// fedprge-client: a native fedprge client. See clients/native/README.md.
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <unistd.h>

#include "handlers.h"
#include "node.h"
#include "tools.h"

namespace {

const char* kUsage =
    "usage:\n"
    "  fedprge-client --superlink HOST:PORT (--root-certificates CA.crt | --insecure) [--auth-key KEY.pem]\n"
    "                 --pte PROGRAM.pte --data DATA.json --state STATE.bin [--table gaussian_table.f32]\n"
    "                 [--threads 1] [--heartbeat-interval 30] [--max-wait 300]\n"
    "  fedprge-client vectors [--table gaussian_table.f32]\n"
    "  fedprge-client check-train --pte P.pte --data DATA.json --config RUN.yaml --round R [--table T]\n"
    "  fedprge-client replies --messages MESSAGES.json --pte P.pte --data DATA.json --state STATE.bin\n"
    "  fedprge-client bench-step --pte P.pte --data DATA.json --config RUN.yaml [--steps 20] [--threads 1]\n";

std::string default_table() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  std::string exe = n > 0 ? std::string(buf, size_t(n)) : "./fedprge-client";
  return exe.substr(0, exe.rfind('/') + 1) + "gaussian_table.f32";
}

double number(const std::map<std::string, std::string>& a, const std::string& key, double fallback) {
  auto it = a.find(key);
  if (it == a.end()) return fallback;
  char* end = nullptr;
  double v = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end) throw std::runtime_error(key + " " + it->second + " is not a number");
  return v;
}

std::string required(const std::map<std::string, std::string>& a, const std::string& key) {
  auto it = a.find(key);
  if (it == a.end() || it->second.empty()) throw std::runtime_error("missing " + key + "\n" + kUsage);
  return it->second;
}

}  // namespace

int main(int argc, char** argv) {
  std::string command = argc > 1 && argv[1][0] != '-' ? argv[1] : "run";
  std::map<std::string, std::string> args;
  for (int i = command == "run" ? 1 : 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (a == "--insecure") {
      args[a] = "1";
    } else if (a.rfind("--", 0) == 0 && i + 1 < argc) {
      args[a] = argv[++i];
    } else {
      std::cerr << "fedprge-client: unexpected argument '" << a << "'\n" << kUsage;
      return 2;
    }
  }
  try {
    const std::string table = args.count("--table") ? args["--table"] : default_table();
    if (command == "vectors") return fedprge::print_vectors(table);
    const int threads = int(number(args, "--threads", 1));
    if (command == "check-train") {
      return fedprge::print_train_check(required(args, "--pte"), required(args, "--data"), table,
                                        required(args, "--config"), (long long)number(args, "--round", 1), threads);
    }
    if (command == "replies") {
      return fedprge::print_replies(required(args, "--messages"), required(args, "--pte"), required(args, "--data"),
                                    table, required(args, "--state"), threads);
    }
    if (command == "bench-step") {
      return fedprge::print_step_bench(required(args, "--pte"), required(args, "--data"), table,
                                       required(args, "--config"), int(number(args, "--steps", 20)), threads);
    }
    if (command != "run") throw std::runtime_error("unknown command '" + command + "'\n" + kUsage);
    fedprge::NodeOptions node;
    node.endpoint.address = required(args, "--superlink");
    node.endpoint.insecure = args.count("--insecure") > 0;
    node.endpoint.root_certificates = args.count("--root-certificates") ? args["--root-certificates"] : "";
    if (node.endpoint.insecure == !node.endpoint.root_certificates.empty()) {
      throw std::runtime_error("choose --root-certificates CA.crt (TLS) or, knowingly, --insecure (plain HTTP)");
    }
    node.key = args.count("--auth-key") ? args["--auth-key"] : "";
    node.heartbeat_interval = number(args, "--heartbeat-interval", 30);
    node.max_wait = number(args, "--max-wait", 300);
    fedprge::ClientFiles files{required(args, "--pte"), required(args, "--data"), table, required(args, "--state"), threads};
    fedprge::Handlers handlers(files);
    return fedprge::run_node(node, handlers);
  } catch (const std::exception& e) {
    std::cerr << "fedprge-client: " << e.what() << std::endl;
    return 2;
  }
}

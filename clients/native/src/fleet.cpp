#include "fleet.h"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

namespace fedprge {

namespace {

size_t collect(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

bool transient_curl(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
      return true;
    default:
      return false;
  }
}

struct CurlInit {
  CurlInit() { curl_global_init(CURL_GLOBAL_DEFAULT); }
};

}  // namespace

Fleet::Fleet(const Endpoint& endpoint, const NodeKey& key, double call_timeout_s)
    : endpoint_(endpoint), key_(key), timeout_s_(call_timeout_s) {
  static CurlInit init;
  curl_ = curl_easy_init();
  if (!curl_) throw std::runtime_error("libcurl could not start");
}

Fleet::~Fleet() { curl_easy_cleanup(static_cast<CURL*>(curl_)); }

void Fleet::call(const std::string& path, const google::protobuf::Message& request, google::protobuf::Message& response) {
  CURL* c = static_cast<CURL*>(curl_);
  const std::string url = std::string(endpoint_.insecure ? "http://" : "https://") + endpoint_.address + "/v1/fleet/" + path;
  std::string body, answer;
  request.SerializeToString(&body);
  curl_slist* headers = nullptr;
  headers = curl_slist_append(headers, "content-type: application/protobuf");
  headers = curl_slist_append(headers, "accept: application/protobuf");
  headers = curl_slist_append(headers, "flwr-package-name: flwr");
  headers = curl_slist_append(headers, "flwr-package-version: 1.42.0");
  headers = curl_slist_append(headers, "flwr-component-name: SuperNode");
  for (const auto& h : key_.headers()) headers = curl_slist_append(headers, (h.first + ": " + h.second).c_str());
  curl_easy_reset(c);
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_POST, 1L);
  curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, long(body.size()));
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &answer);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, long(timeout_s_ * 1000));
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  if (!endpoint_.insecure && !endpoint_.root_certificates.empty()) {
    curl_easy_setopt(c, CURLOPT_CAINFO, endpoint_.root_certificates.c_str());
  }
  CURLcode rc = curl_easy_perform(c);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) {
    throw FleetError(path + ": " + curl_easy_strerror(rc), transient_curl(rc), 0);
  }
  if (status != 200) {
    std::string detail = answer.substr(0, 300);
    std::replace(detail.begin(), detail.end(), '\n', ' ');
    throw FleetError(path + ": HTTP " + std::to_string(status) + (detail.empty() ? "" : " " + detail),
                     status == 502 || status == 503 || status == 504, status);
  }
  if (!response.ParseFromString(answer)) throw FleetError(path + ": the answer is not a protobuf message", false, status);
}

void with_retry(const std::string& what, const Endpoint& endpoint, double max_wait_s, const std::function<void()>& fn,
                const std::function<bool()>& stop) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  std::mt19937 jitter(std::random_device{}());
  double delay = 0.5;
  for (int attempt = 1;; ++attempt) {
    try {
      fn();
      return;
    } catch (const FleetError& e) {
      double waited = std::chrono::duration<double>(clock::now() - start).count();
      if (e.status == 401 || e.status == 403 || e.status == 412) {
        throw Refused(what + " refused by SuperLink " + endpoint.address + ": " + e.what());
      }
      if (!e.transient) throw std::runtime_error(what + " failed at SuperLink " + endpoint.address + ": " + e.what());
      if (waited + delay > max_wait_s || (stop && stop())) {
        throw Unreachable("cannot reach the SuperLink at " + endpoint.address + " (" + e.what() + ") after " +
                                 std::to_string(attempt) + " tries in " + std::to_string(int(waited + 0.5)) +
                                 " s; is it running, and is --superlink right?");
      }
      double sleep = delay * std::uniform_real_distribution<double>(0.8, 1.2)(jitter);
      std::this_thread::sleep_for(std::chrono::duration<double>(sleep));
      delay = std::min(delay * 2, 15.0);
    }
  }
}

}  // namespace fedprge

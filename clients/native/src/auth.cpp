#include "auth.h"

#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <stdexcept>

namespace fedprge {

struct NodeKey::Impl {
  EVP_PKEY* key = nullptr;
  ~Impl() { EVP_PKEY_free(key); }
};

namespace {

std::string public_pem_of(EVP_PKEY* key) {
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(bio, key);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  std::string pem(data, size_t(n));
  BIO_free(bio);
  return pem;
}

std::string openssl_error() {
  unsigned long e = ERR_get_error();
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

}  // namespace

NodeKey::NodeKey(NodeKey&&) noexcept = default;
NodeKey::~NodeKey() = default;

NodeKey NodeKey::load(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) throw std::runtime_error("SuperNode key '" + path + "' does not exist or cannot be read");
  EVP_PKEY* key = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  if (!key) {
    throw std::runtime_error("SuperNode key '" + path + "' is not a PEM private key (" + openssl_error() +
                             "); make one with: ssh-keygen -t ecdsa -b 384 -m PEM -N '' -f KEY");
  }
  if (EVP_PKEY_base_id(key) != EVP_PKEY_EC) {
    EVP_PKEY_free(key);
    throw std::runtime_error("SuperNode key '" + path + "' is not an elliptic-curve key");
  }
  NodeKey k;
  k.impl_ = std::make_unique<Impl>();
  k.impl_->key = key;
  k.public_pem_ = public_pem_of(key);
  return k;
}

NodeKey NodeKey::generate() {
  EVP_PKEY* key = EVP_EC_gen("P-384");
  if (!key) throw std::runtime_error("cannot generate an EC key: " + openssl_error());
  NodeKey k;
  k.impl_ = std::make_unique<Impl>();
  k.impl_->key = key;
  k.public_pem_ = public_pem_of(key);
  return k;
}

std::string base64(const std::string& bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(&out[0]), reinterpret_cast<const unsigned char*>(bytes.data()),
                          int(bytes.size()));
  out.resize(size_t(n));
  return out;
}

std::string iso_timestamp_utc() {
  using namespace std::chrono;
  auto now = system_clock::now();
  auto us = duration_cast<microseconds>(now.time_since_epoch()).count();
  std::time_t secs = std::time_t(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lld+00:00", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(us % 1000000));
  return buf;
}

std::vector<std::pair<std::string, std::string>> NodeKey::headers() const {
  const std::string ts = iso_timestamp_utc();
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  size_t len = 0;
  std::string sig;
  if (EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, impl_->key) == 1 &&
      EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(ts.data()), ts.size()) == 1) {
    sig.resize(len);
    if (EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(&sig[0]), &len,
                       reinterpret_cast<const unsigned char*>(ts.data()), ts.size()) == 1) {
      sig.resize(len);
    } else {
      sig.clear();
    }
  }
  EVP_MD_CTX_free(ctx);
  if (sig.empty()) throw std::runtime_error("cannot sign the request timestamp: " + openssl_error());
  return {{"flwr-public-key", base64(public_pem_)}, {"flwr-timestamp", ts}, {"flwr-signature", base64(sig)}};
}

}  // namespace fedprge

// SHA-256 (FIPS 180-4) of a file or a buffer, as a lowercase hex string.
//
//   std::string h = tq::sha256_file("model.gguf");
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tq {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();  // finishes; the object is then spent

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const void* data, size_t n);
std::string sha256_file(const std::string& path);  // throws tq::Error if unreadable

}  // namespace tq

// GGUF v2/v3 reader: metadata, tensor infos and the tensor data of a file,
// memory-mapped. Every read is bounds-checked; a truncated, corrupted or
// hostile file gives tq::Error naming what is wrong and where (byte offset),
// never a crash.
//
//   auto f = tq::gguf::File::open("model.gguf");
//   std::string arch = f.get_string("general.architecture");
//   const tq::gguf::TensorInfo& t = f.tensor("token_embd.weight");
//   // t.data: t.bytes bytes of ggml blocks of type t.type, dims t.dims (innermost first)
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "turboquant/ggml_blocks.hpp"

namespace tq::gguf {

enum class ValueType : uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
  string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};
std::string to_string(ValueType t);

struct Value {
  ValueType type = ValueType::u8;
  uint64_t u = 0;   // unsigned integers and bool
  int64_t i = 0;    // signed integers
  double f = 0;     // floats
  std::string s;    // string
  ValueType elem = ValueType::u8;  // array element type
  std::vector<Value> items;        // array items

  bool is_integer() const;
  int64_t as_int() const;   // any integer type (throws otherwise)
  double as_float() const;  // any number
};

struct TensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // innermost (contiguous) first, as in the file
  ggml::Type type = ggml::Type::f32;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t n_elements = 0;
  uint64_t bytes = 0;
  const uint8_t* data = nullptr;
};

class File {
 public:
  static File open(const std::string& path);
  static File from_memory(std::vector<uint8_t> bytes, std::string name = "<memory>");

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  size_t size() const { return size_; }
  const std::map<std::string, Value>& metadata() const { return kv_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  bool has(const std::string& key) const { return kv_.count(key) != 0; }
  const Value& get(const std::string& key) const;  // throws naming the missing key
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  std::optional<int64_t> find_int(const std::string& key) const;
  std::optional<double> find_float(const std::string& key) const;
  std::vector<std::string> get_strings(const std::string& key) const;
  std::vector<double> get_floats(const std::string& key) const;
  std::vector<int64_t> get_ints(const std::string& key) const;

  const TensorInfo* find_tensor(const std::string& name) const;
  const TensorInfo& tensor(const std::string& name) const;  // throws naming the tensor

 private:
  void parse();
  std::string path_;
  std::shared_ptr<const uint8_t> base_;  // mmap or owned memory
  size_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, Value> kv_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
};

}  // namespace tq::gguf

// GGUF reader. Layout (little-endian): magic "GGUF", u32 version (2 or 3),
// u64 tensor count, u64 metadata count; metadata (string key, u32 type,
// value); tensor infos (string name, u32 n_dims, u64 dims[n_dims], u32 type,
// u64 offset); padding to `general.alignment` (default 32); tensor data.
// Strings are u64 length + bytes; arrays are u32 element type + u64 count +
// elements.
#include "turboquant/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "turboquant/error.hpp"

namespace tq::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF"
constexpr uint32_t kMaxDims = 4;
constexpr int kMaxArrayDepth = 2;

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& name) : p_(p), n_(n), name_(name) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return n_ - pos_; }
  void need(size_t k, const char* what) const {
    if (k > n_ - pos_)
      TQ_THROW("GGUF ", name_, ": truncated at byte ", pos_, " reading ", what, " (need ", k,
               " bytes, ", n_ - pos_, " left)");
  }
  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t len = read<uint64_t>(what);
    if (len > remaining())
      TQ_THROW("GGUF ", name_, ": ", what, " at byte ", pos_ - 8, " claims ", len,
               " bytes but only ", remaining(), " remain");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  const std::string& name() const { return name_; }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const std::string& name_;
};

size_t min_size(ValueType t) {
  switch (t) {
    case ValueType::u8: case ValueType::i8: case ValueType::boolean: return 1;
    case ValueType::u16: case ValueType::i16: return 2;
    case ValueType::u32: case ValueType::i32: case ValueType::f32: return 4;
    case ValueType::u64: case ValueType::i64: case ValueType::f64: case ValueType::string: return 8;
    case ValueType::array: return 12;
  }
  return 1;
}

bool valid_type(uint32_t t) { return t <= 12; }

Value read_value(Reader& r, ValueType t, const std::string& key, int depth) {
  Value v;
  v.type = t;
  switch (t) {
    case ValueType::u8: v.u = r.read<uint8_t>("u8"); break;
    case ValueType::i8: v.i = r.read<int8_t>("i8"); break;
    case ValueType::u16: v.u = r.read<uint16_t>("u16"); break;
    case ValueType::i16: v.i = r.read<int16_t>("i16"); break;
    case ValueType::u32: v.u = r.read<uint32_t>("u32"); break;
    case ValueType::i32: v.i = r.read<int32_t>("i32"); break;
    case ValueType::u64: v.u = r.read<uint64_t>("u64"); break;
    case ValueType::i64: v.i = r.read<int64_t>("i64"); break;
    case ValueType::f32: v.f = r.read<float>("f32"); break;
    case ValueType::f64: v.f = r.read<double>("f64"); break;
    case ValueType::boolean: {
      const uint8_t b = r.read<uint8_t>("bool");
      if (b > 1) TQ_THROW("GGUF ", r.name(), ": key '", key, "': bool value ", int(b), " is not 0 or 1");
      v.u = b;
      break;
    }
    case ValueType::string: v.s = r.read_string("string value"); break;
    case ValueType::array: {
      if (depth >= kMaxArrayDepth)
        TQ_THROW("GGUF ", r.name(), ": key '", key, "': arrays nested deeper than ", kMaxArrayDepth);
      const uint32_t et = r.read<uint32_t>("array element type");
      if (!valid_type(et))
        TQ_THROW("GGUF ", r.name(), ": key '", key, "': unknown array element type ", et);
      const uint64_t count = r.read<uint64_t>("array length");
      v.elem = static_cast<ValueType>(et);
      if (count > r.remaining() / min_size(v.elem))
        TQ_THROW("GGUF ", r.name(), ": key '", key, "': array of ", count, " ", to_string(v.elem),
                 " cannot fit in the ", r.remaining(), " bytes left");
      v.items.reserve(count);
      for (uint64_t k = 0; k < count; ++k) v.items.push_back(read_value(r, v.elem, key, depth + 1));
      break;
    }
  }
  return v;
}

}  // namespace

std::string to_string(ValueType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i <= 12 ? names[i] : "type#" + std::to_string(i);
}

bool Value::is_integer() const {
  switch (type) {
    case ValueType::u8: case ValueType::i8: case ValueType::u16: case ValueType::i16:
    case ValueType::u32: case ValueType::i32: case ValueType::u64: case ValueType::i64:
    case ValueType::boolean:
      return true;
    default: return false;
  }
}

int64_t Value::as_int() const {
  switch (type) {
    case ValueType::u8: case ValueType::u16: case ValueType::u32: case ValueType::u64:
    case ValueType::boolean:
      TQ_REQUIRE(u <= uint64_t(INT64_MAX), "GGUF integer ", u, " is too large");
      return static_cast<int64_t>(u);
    case ValueType::i8: case ValueType::i16: case ValueType::i32: case ValueType::i64: return i;
    default: TQ_THROW("GGUF value of type ", to_string(type), " is not an integer");
  }
}

double Value::as_float() const {
  if (type == ValueType::f32 || type == ValueType::f64) return f;
  return static_cast<double>(as_int());
}

File File::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) TQ_THROW("cannot open GGUF file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    TQ_THROW("cannot stat '", path, "'");
  }
  const size_t n = static_cast<size_t>(st.st_size);
  File f;
  f.path_ = path;
  f.size_ = n;
  if (n == 0) {
    ::close(fd);
    TQ_THROW("GGUF ", path, ": the file is empty");
  }
  void* p = mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) TQ_THROW("cannot mmap '", path, "': ", std::strerror(errno));
  f.base_ = std::shared_ptr<const uint8_t>(static_cast<const uint8_t*>(p),
                                           [n](const uint8_t* q) { munmap(const_cast<uint8_t*>(q), n); });
  f.parse();
  return f;
}

File File::from_memory(std::vector<uint8_t> bytes, std::string name) {
  File f;
  f.path_ = std::move(name);
  f.size_ = bytes.size();
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  f.base_ = std::shared_ptr<const uint8_t>(owned, owned->data());
  f.parse();
  return f;
}

void File::parse() {
  Reader r(base_.get(), size_, path_);
  const uint32_t magic = r.read<uint32_t>("magic");
  if (magic != kMagic) TQ_THROW("GGUF ", path_, ": not a GGUF file (bad magic at byte 0)");
  version_ = r.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    TQ_THROW("GGUF ", path_, ": unsupported version ", version_, " (supported: 2, 3)");
  const uint64_t n_tensors = r.read<uint64_t>("tensor count");
  const uint64_t n_kv = r.read<uint64_t>("metadata count");
  // Each entry takes at least 12 (kv) or 24 (tensor info) bytes.
  if (n_kv > r.remaining() / 12 || n_tensors > r.remaining() / 24)
    TQ_THROW("GGUF ", path_, ": header claims ", n_kv, " metadata entries and ", n_tensors,
             " tensors, more than the file can hold");
  for (uint64_t k = 0; k < n_kv; ++k) {
    const size_t at = r.pos();
    std::string key = r.read_string("metadata key");
    const uint32_t t = r.read<uint32_t>("metadata type");
    if (!valid_type(t)) TQ_THROW("GGUF ", path_, ": key '", key, "' at byte ", at, " has unknown type ", t);
    Value v = read_value(r, static_cast<ValueType>(t), key, 0);
    if (!kv_.emplace(key, std::move(v)).second)
      TQ_THROW("GGUF ", path_, ": metadata key '", key, "' appears twice");
  }
  if (auto it = kv_.find("general.alignment"); it != kv_.end()) {
    const int64_t a = it->second.as_int();
    if (a <= 0 || a > 65536 || (a & (a - 1)))
      TQ_THROW("GGUF ", path_, ": general.alignment ", a, " is not a power of two in 1..65536");
    alignment_ = static_cast<uint64_t>(a);
  }
  tensors_.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo ti;
    ti.name = r.read_string("tensor name");
    const uint32_t nd = r.read<uint32_t>("tensor n_dims");
    if (nd == 0 || nd > kMaxDims)
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' has ", nd, " dimensions (1..", kMaxDims, ")");
    ti.n_elements = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t dim = r.read<uint64_t>("tensor dim");
      if (dim == 0 || dim > (uint64_t(1) << 40) || ti.n_elements > (uint64_t(1) << 48) / dim)
        TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' has an invalid dimension ", dim);
      ti.dims.push_back(dim);
      ti.n_elements *= dim;
    }
    const uint32_t type = r.read<uint32_t>("tensor type");
    if (!ggml::is_known_type(type))
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' has unknown ggml type ", type);
    ti.type = static_cast<ggml::Type>(type);
    const ggml::TypeTraits& tr = ggml::traits(ti.type);
    if (ti.dims[0] % tr.block_elems != 0)
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' row of ", ti.dims[0],
               " elements is not a multiple of the ", tr.name, " block size ", tr.block_elems);
    ti.bytes = ti.n_elements / tr.block_elems * tr.block_bytes;
    ti.offset = r.read<uint64_t>("tensor offset");
    if (ti.offset % alignment_ != 0)
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' offset ", ti.offset,
               " is not a multiple of the alignment ", alignment_);
    if (!index_.emplace(ti.name, tensors_.size()).second)
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' appears twice");
    tensors_.push_back(std::move(ti));
  }
  const uint64_t data_start = (r.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (data_start > size_ && n_tensors > 0)
    TQ_THROW("GGUF ", path_, ": truncated before the tensor data (at byte ", r.pos(), ")");
  for (auto& ti : tensors_) {
    if (ti.offset > size_ - std::min<uint64_t>(size_, data_start) ||
        ti.bytes > size_ - data_start - ti.offset)
      TQ_THROW("GGUF ", path_, ": tensor '", ti.name, "' (", ti.bytes, " bytes at data offset ",
               ti.offset, ") runs past the end of the file (", size_, " bytes): truncated?");
    ti.data = base_.get() + data_start + ti.offset;
  }
}

const Value& File::get(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) TQ_THROW("GGUF ", path_, ": metadata key '", key, "' is missing");
  return it->second;
}

std::string File::get_string(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.type == ValueType::string, "GGUF ", path_, ": key '", key, "' is ", to_string(v.type),
             ", expected a string");
  return v.s;
}

int64_t File::get_int(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.is_integer(), "GGUF ", path_, ": key '", key, "' is ", to_string(v.type),
             ", expected an integer");
  return v.as_int();
}

double File::get_float(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.is_integer() || v.type == ValueType::f32 || v.type == ValueType::f64, "GGUF ", path_,
             ": key '", key, "' is ", to_string(v.type), ", expected a number");
  return v.as_float();
}

std::optional<int64_t> File::find_int(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  return get_int(key);
}

std::optional<double> File::find_float(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  return get_float(key);
}

std::vector<std::string> File::get_strings(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.type == ValueType::array && v.elem == ValueType::string, "GGUF ", path_, ": key '", key,
             "' is not an array of strings");
  std::vector<std::string> out;
  out.reserve(v.items.size());
  for (const auto& it : v.items) out.push_back(it.s);
  return out;
}

std::vector<double> File::get_floats(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.type == ValueType::array && v.elem != ValueType::string && v.elem != ValueType::array,
             "GGUF ", path_, ": key '", key, "' is not an array of numbers");
  std::vector<double> out;
  for (const auto& it : v.items) out.push_back(it.as_float());
  return out;
}

std::vector<int64_t> File::get_ints(const std::string& key) const {
  const Value& v = get(key);
  TQ_REQUIRE(v.type == ValueType::array && v.elem != ValueType::string && v.elem != ValueType::array &&
                 v.elem != ValueType::f32 && v.elem != ValueType::f64,
             "GGUF ", path_, ": key '", key, "' is not an array of integers");
  std::vector<int64_t> out;
  for (const auto& it : v.items) out.push_back(it.as_int());
  return out;
}

const TensorInfo* File::find_tensor(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(const std::string& name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) TQ_THROW("GGUF ", path_, ": tensor '", name, "' is missing");
  return *t;
}

}  // namespace tq::gguf

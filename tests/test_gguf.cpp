// GGUF reader and ggml block decoders: golden values from an independent
// implementation, synthetic files, and every kind of broken input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "turboquant/error.hpp"
#include "turboquant/ggml_blocks.hpp"
#include "turboquant/gguf.hpp"
#include "turboquant/half.hpp"

namespace tq {
namespace {

using ggml::Type;

Type type_by_name(const std::string& n) {
  for (Type t : {Type::f32, Type::f16, Type::bf16, Type::q4_0, Type::q4_1, Type::q5_0, Type::q5_1,
                 Type::q8_0, Type::q4_k, Type::q5_k, Type::q6_k, Type::q8_k})
    if (ggml::traits(t).name == n) return t;
  throw std::runtime_error("unknown type " + n);
}

TEST(GgmlBlocks, MatchTheGgufPythonPackageOnRandomBlocks) {
  std::ifstream in(std::string(TQ_TEST_DATA_DIR) + "/ggml_golden.txt");
  ASSERT_TRUE(in) << "missing tests/data/ggml_golden.txt";
  std::string line;
  int checked = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::string name, hex, bar;
    size_t n_blocks = 0;
    ss >> name >> n_blocks >> hex >> bar;
    const Type t = type_by_name(name);
    std::vector<uint8_t> raw(hex.size() / 2);
    for (size_t i = 0; i < raw.size(); ++i) raw[i] = uint8_t(std::stoul(hex.substr(2 * i, 2), nullptr, 16));
    const size_t n = n_blocks * ggml::traits(t).block_elems;
    ASSERT_EQ(raw.size(), ggml::row_bytes(t, n)) << name;
    std::vector<float> want(n), got(n);
    for (auto& w : want) ss >> w;
    ASSERT_TRUE(ss) << name << ": short golden line";
    ggml::dequantize_row(t, raw.data(), n, got.data());
    for (size_t i = 0; i < n; ++i)
      ASSERT_NEAR(got[i], want[i], 1e-6 * std::fabs(want[i]) + 1e-7) << name << " element " << i;
    ++checked;
  }
  EXPECT_EQ(checked, 10);
}

TEST(GgmlBlocks, Q8KByHand) {
  ggml::BlockQ8_K b{};
  b.d = 0.5f;
  for (int i = 0; i < 256; ++i) b.qs[i] = int8_t(i - 128);
  std::vector<float> y(256);
  ggml::dequantize_row(Type::q8_k, &b, 256, y.data());
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], 0.5f * (i - 128));
}

TEST(GgmlBlocks, BadSizesAndUnsupportedTypes) {
  std::vector<uint8_t> buf(1024);
  std::vector<float> y(64);
  EXPECT_THROW(ggml::dequantize_row(Type::q4_0, buf.data(), 33, y.data()), Error);
  EXPECT_THROW(ggml::dequantize_row(Type::q2_k, buf.data(), 256, y.data()), Error);
  EXPECT_THROW(ggml::traits(static_cast<Type>(99)), Error);
  EXPECT_EQ(ggml::row_bytes(Type::q4_k, 512), 288u);
}

// ---- a small GGUF writer for tests ---------------------------------------
struct Writer {
  std::vector<uint8_t> b;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
  }
};

// A valid file: 4 metadata entries and 2 tensors (f32 [8] and q8_0 [32 x 2]).
std::vector<uint8_t> sample_file() {
  Writer w;
  w.put<uint32_t>(0x46554747);
  w.put<uint32_t>(3);
  w.put<uint64_t>(2);  // tensors
  w.put<uint64_t>(4);  // kv
  w.str("general.architecture");
  w.put<uint32_t>(8);
  w.str("llama");
  w.str("llama.block_count");
  w.put<uint32_t>(4);
  w.put<uint32_t>(30);
  w.str("llama.rope.freq_base");
  w.put<uint32_t>(6);
  w.put<float>(10000.0f);
  w.str("tokenizer.ggml.tokens");
  w.put<uint32_t>(9);
  w.put<uint32_t>(8);
  w.put<uint64_t>(3);
  w.str("a");
  w.str("bc");
  w.str("<s>");
  w.str("norm.weight");
  w.put<uint32_t>(1);
  w.put<uint64_t>(8);
  w.put<uint32_t>(0);  // f32
  w.put<uint64_t>(0);
  w.str("w.weight");
  w.put<uint32_t>(2);
  w.put<uint64_t>(32);
  w.put<uint64_t>(2);
  w.put<uint32_t>(8);  // q8_0
  w.put<uint64_t>(32);
  while (w.b.size() % 32) w.b.push_back(0);
  for (int i = 0; i < 8; ++i) w.put<float>(float(i) * 0.5f);
  while (w.b.size() % 32) w.b.push_back(0);
  for (int blk = 0; blk < 2; ++blk) {
    w.put<uint16_t>(float_to_half(0.25f));
    for (int i = 0; i < 32; ++i) w.put<int8_t>(int8_t(i - 16 + blk));
  }
  return w.b;
}

TEST(Gguf, ReadsMetadataAndTensors) {
  const gguf::File f = gguf::File::from_memory(sample_file());
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_FLOAT_EQ(f.get_float("llama.rope.freq_base"), 10000.0);
  EXPECT_EQ(f.get_strings("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "bc", "<s>"}));
  EXPECT_FALSE(f.find_int("missing.key"));
  const auto& n = f.tensor("norm.weight");
  std::vector<float> y(8);
  ggml::dequantize_row(n.type, n.data, 8, y.data());
  EXPECT_EQ(y[3], 1.5f);
  const auto& w = f.tensor("w.weight");
  EXPECT_EQ(w.dims, (std::vector<uint64_t>{32, 2}));
  EXPECT_EQ(w.bytes, 68u);
  std::vector<float> z(64);
  ggml::dequantize_row(w.type, w.data, 64, z.data());
  EXPECT_EQ(z[0], -4.0f);
  EXPECT_EQ(z[33], 0.25f * (1 - 16 + 1));
}

TEST(Gguf, ErrorsNameWhatIsWrong) {
  auto err = [](std::vector<uint8_t> b) {
    try {
      gguf::File::from_memory(std::move(b));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const auto good = sample_file();
  auto bad = good;
  bad[0] = 'X';
  EXPECT_NE(err(bad).find("bad magic"), std::string::npos);
  bad = good;
  bad[4] = 7;
  EXPECT_NE(err(bad).find("unsupported version 7"), std::string::npos);
  const gguf::File f = gguf::File::from_memory(good);
  EXPECT_THROW(f.get_string("llama.block_count"), Error);
  EXPECT_THROW(f.tensor("nope"), Error);
  try {
    f.get("nope.key");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'nope.key' is missing"), std::string::npos);
  }
  // A huge string length.
  bad = good;
  const uint64_t huge = ~uint64_t(0) >> 1;
  std::memcpy(&bad[24], &huge, 8);
  EXPECT_NE(err(bad).find("claims"), std::string::npos);
  // Missing file.
  EXPECT_THROW(gguf::File::open("/nonexistent/model.gguf"), Error);
}

TEST(Gguf, EveryTruncationIsAnErrorNeverACrash) {
  const auto good = sample_file();
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> b(good.begin(), good.begin() + n);
    EXPECT_THROW(gguf::File::from_memory(std::move(b)), Error) << "prefix " << n;
  }
}

TEST(Gguf, EveryFlippedByteIsHandled) {
  // A flip may still give a valid file (e.g. in tensor data); it must never
  // crash or read out of bounds (ASan checks the latter).
  const auto good = sample_file();
  int errors = 0;
  for (size_t i = 0; i < good.size(); ++i)
    for (uint8_t mask : {uint8_t(0x01), uint8_t(0x80), uint8_t(0xff)}) {
      auto b = good;
      b[i] ^= mask;
      try {
        const gguf::File f = gguf::File::from_memory(std::move(b));
        for (const auto& t : f.tensors()) {
          std::vector<float> y(t.n_elements);
          if (ggml::traits(t.type).supported) ggml::dequantize_row(t.type, t.data, t.n_elements, y.data());
        }
      } catch (const Error&) {
        ++errors;
      }
    }
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace tq

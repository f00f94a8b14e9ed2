// libFuzzer target: the GGUF reader, the block decoders and the tokenizer
// construction on arbitrary bytes. Any tq::Error is fine; a crash, a hang, an
// out-of-bounds access (ASan) or undefined behaviour (UBSan) is a finding.
// Build: cmake --preset fuzz && cmake --build --preset fuzz
// Run:   build/fuzz/fuzz/fuzz_gguf -max_total_time=600 fuzz/corpus
#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/error.hpp"
#include "turboquant/ggml_blocks.hpp"
#include "turboquant/gguf.hpp"
#include "turboquant/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const tq::gguf::File f = tq::gguf::File::from_memory(std::vector<uint8_t>(data, data + size));
    for (const auto& [key, value] : f.metadata()) {
      if (value.is_integer()) (void)value.as_int();
    }
    std::vector<float> y;
    for (const auto& t : f.tensors()) {
      if (!tq::ggml::traits(t.type).supported || t.n_elements > (1u << 20)) continue;
      y.resize(t.n_elements);
      tq::ggml::dequantize_row(t.type, t.data, t.n_elements, y.data());
    }
    try {
      const tq::Tokenizer tok = tq::Tokenizer::from_gguf(f);
      const auto ids = tok.encode("Hello, world! 123 \xc3\xa9", true);
      (void)tok.decode(ids);
    } catch (const tq::Error&) {
    }
  } catch (const tq::Error&) {
  }
  return 0;
}

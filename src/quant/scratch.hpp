// Per-thread scratch for encode/decode of one vector. Frames nest (a split
// quantizer calls two MSE quantizers), and once warm nothing is allocated.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace tq::quant {

class Scratch {
 public:
  explicit Scratch(size_t n) {
    auto& st = stack();
    if (st.frames.size() <= st.depth) st.frames.push_back(std::make_unique<Frame>());
    Frame& f = *st.frames[st.depth++];
    if (f.floats.size() < 4 * n) f.floats.resize(4 * n);
    if (f.bytes.size() < n) f.bytes.resize(n);
    y = f.floats.data();
    c = y + n;
    r = c + n;
    z = r + n;
    codes = f.bytes.data();
  }
  ~Scratch() { --stack().depth; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  float *y, *c, *r, *z;  // each [n]
  uint8_t* codes;        // [n]

 private:
  struct Frame {
    std::vector<float> floats;
    std::vector<uint8_t> bytes;
  };
  struct Stack {
    std::vector<std::unique_ptr<Frame>> frames;
    size_t depth = 0;
  };
  static Stack& stack() {
    thread_local Stack s;
    return s;
  }
};

}  // namespace tq::quant

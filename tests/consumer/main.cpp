// Compiled against an installed turboquant only (no source tree on the
// include path): any public header that reaches into src/ fails here.
#include <turboquant/turboquant.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  auto q = tq::make_quantizer("tq-mse:b=4", 128, /*seed=*/1);
  std::vector<float> x(128), y(128);
  for (int i = 0; i < 128; ++i) x[i] = std::sin(0.1f * i);
  std::vector<uint8_t> rec(q->bytes_per_vector());
  q->encode(x, rec);
  q->decode(rec, y);
  double err = 0, norm = 0;
  for (int i = 0; i < 128; ++i) {
    err += (x[i] - y[i]) * (x[i] - y[i]);
    norm += x[i] * x[i];
  }
  std::printf("turboquant %s consumer: %s, %zu bytes/vector, rel. error %.4f, SIMD %s\n",
              tq::kVersion, tq::to_string(q->spec()).c_str(), q->bytes_per_vector(), err / norm,
              tq::to_string(tq::best_simd_level()).c_str());
  return rec.size() == 66 && err / norm < 0.02 ? 0 : 1;
}

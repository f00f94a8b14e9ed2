// Scalar reference kernels: the specification every SIMD path must match bit
// for bit (see kernels.hpp for the ordering rules).
#include <cstring>

#include "kernels/kernels.hpp"

namespace tq::kernels {
namespace {

constexpr int kLanes = 16;

float reduce_lanes(float* lane) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) lane[i] += lane[i + w];
  return lane[0];
}

float sum_squares_ref(const float* x, int n) {
  float lane[kLanes] = {};
  for (int i = 0; i < n; ++i) lane[i % kLanes] += x[i] * x[i];
  return reduce_lanes(lane);
}

float dot_ref(const float* a, const float* b, int n) {
  float lane[kLanes] = {};
  for (int i = 0; i < n; ++i) lane[i % kLanes] += a[i] * b[i];
  return reduce_lanes(lane);
}

void scale_ref(float* x, int n, float s) {
  for (int i = 0; i < n; ++i) x[i] *= s;
}

void mul_signs_ref(float* x, const float* signs, int n) {
  for (int i = 0; i < n; ++i) x[i] *= signs[i];
}

void fwht_ref(float* x, int n, float post_scale) {
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  for (int i = 0; i < n; ++i) x[i] *= post_scale;
}

void matvec_ref(const float* m_cols, const float* x, float* y, int rows, int cols) {
  for (int i = 0; i < rows; ++i) y[i] = 0.0f;
  for (int j = 0; j < cols; ++j) {
    const float xj = x[j];
    const float* col = m_cols + static_cast<size_t>(j) * rows;
    for (int i = 0; i < rows; ++i) y[i] += col[i] * xj;
  }
}

void quantize_ref(const float* x, int n, float mul, const float* boundaries, int bits,
                  uint8_t* codes) {
  const int n_bounds = (1 << bits) - 1;
  for (int i = 0; i < n; ++i) {
    const float v = x[i] * mul;
    // Branch-free binary search over the sorted boundaries: the count of
    // boundaries strictly below v (a NaN compares false everywhere -> 0).
    int lo = 0;
    for (int step = (n_bounds + 1) / 2; step >= 1; step /= 2)
      if (boundaries[lo + step - 1] < v) lo += step;
    codes[i] = static_cast<uint8_t>(lo);
  }
}

void dequantize_ref(const uint8_t* codes, int n, const float* centroids, int /*bits*/,
                    float* out) {
  for (int i = 0; i < n; ++i) out[i] = centroids[codes[i]];
}

void pack_ref(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
  const size_t n_bytes = (n * bits + 7) / 8;
  std::memset(out, 0, n_bytes);
  for (size_t i = 0; i < n; ++i) {
    const size_t bit = i * bits;
    const unsigned v = static_cast<unsigned>(codes[i]) << (bit % 8);  // <= 15 bits
    out[bit / 8] |= static_cast<uint8_t>(v);
    if ((bit % 8) + bits > 8) out[bit / 8 + 1] |= static_cast<uint8_t>(v >> 8);
  }
}

void unpack_ref(const uint8_t* in, size_t n, int bits, uint8_t* codes) {
  const unsigned mask = (1u << bits) - 1;
  for (size_t i = 0; i < n; ++i) {
    const size_t bit = i * bits;
    unsigned v = in[bit / 8];
    if ((bit % 8) + bits > 8) v |= static_cast<unsigned>(in[bit / 8 + 1]) << 8;
    codes[i] = static_cast<uint8_t>((v >> (bit % 8)) & mask);
  }
}

}  // namespace

const Kernels& kernels_ref() {
  static const Kernels k{SimdLevel::scalar, sum_squares_ref, dot_ref,  scale_ref,
                         mul_signs_ref,     fwht_ref,        matvec_ref, quantize_ref,
                         dequantize_ref,    pack_ref,        unpack_ref};
  return k;
}

}  // namespace tq::kernels

// Vector quantizers: TurboQuant-MSE, TurboQuant-prod (MSE + 1-bit QJL sketch
// of the residual), PolarQuant, and fractional bit widths by channel split.
//
// A quantizer is built from a format (format.hpp), a dimension and a seed;
// the seed fixes the rotation and the QJL sketch (drawn from independent
// streams), so the same (spec, dim, seed) decodes what it encoded on any
// machine and SIMD level.
//
//   auto q = tq::make_quantizer("tq-mse:b=4", 128, /*seed=*/1);
//   std::vector<uint8_t> rec(n * q->bytes_per_vector());
//   q->encode(x, rec);            // x: [n, 128] floats
//   q->decode(rec, x_hat);        // x_hat: [n, 128]
//
// Inner products: for tq-prod, <y, decode(encode(x))> is an unbiased
// estimate of <y, x> (the QJL term is folded into the reconstruction).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "turboquant/format.hpp"
#include "turboquant/simd.hpp"

namespace tq {

struct QuantizerOptions {
  uint64_t seed = 0;
  std::optional<SimdLevel> simd;  // default: tq::simd_level() at construction
  // Fractional tq-mse only: the channels coded at ceil(b), e.g. from
  // select_outlier_channels(); default: channels 0 .. hi-1.
  std::vector<int> hi_channels;
};

class Quantizer {
 public:
  virtual ~Quantizer() = default;

  const FormatSpec& spec() const { return spec_; }
  int dim() const { return dim_; }
  uint64_t seed() const { return seed_; }
  SimdLevel simd() const { return simd_; }
  size_t bytes_per_vector() const { return bytes_; }
  double bits_per_coord() const { return 8.0 * double(bytes_) / dim_; }

  // x: [n, dim] row-major, out: [n, bytes_per_vector()]; n = x.size() / dim.
  // Throws tq::Error on mismatched sizes or a NaN/Inf component (naming the
  // vector and the index). A zero vector decodes to zero.
  void encode(std::span<const float> x, std::span<uint8_t> out) const;
  // in: [n, bytes_per_vector()], x: [n, dim].
  void decode(std::span<const uint8_t> in, std::span<float> x) const;

  // One vector, sizes unchecked. x: [dim], rec: [bytes_per_vector()]
  virtual void encode_one(const float* x, uint8_t* rec) const = 0;
  virtual void decode_one(const uint8_t* rec, float* x) const = 0;

  // ---- Attention directly on records (no dense keys or values) ----------
  // Queries are prepared once (e.g. rotated: <Rq, Rk> = <q, k>), keys scored
  // from their codes, and values accumulated in the quantizer's own domain
  // (e.g. rotated) and mapped back once per output by finish(). g query heads
  // (a GQA group) share every record read.
  //
  // q: [g, dim] -> qp: [g, query_floats()]
  virtual size_t query_floats() const { return static_cast<size_t>(dim_); }
  virtual void prepare_queries(const float* q, int g, float* qp) const;
  // scores[h * n + j] = <q_h, decode(rec_j)>, rec_j = recs + j * stride.
  // qp: [g, query_floats()], scores: [g, n]
  virtual void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
                     float* scores) const;
  // acc_h += sum_j w[h * n + j] * decode(rec_j), in the accumulation domain.
  // w: [g, n], acc: [g, acc_floats()]
  virtual size_t acc_floats() const { return static_cast<size_t>(dim_); }
  virtual void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                          float* acc) const;
  // out_h = the accumulated vector in the original domain. acc: [g, acc_floats()], out: [g, dim]
  virtual void finish(const float* acc, int g, float* out) const;

 protected:
  Quantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  // Decode into the accumulation domain (the default score/accumulate use it;
  // the default is decode_one, i.e. the original domain).
  virtual void decode_domain(const uint8_t* rec, float* out) const { decode_one(rec, out); }

 private:
  FormatSpec spec_;
  int dim_;
  uint64_t seed_;
  SimdLevel simd_;
  size_t bytes_;
};

std::unique_ptr<Quantizer> make_quantizer(const FormatSpec& spec, int dim,
                                          const QuantizerOptions& options = {});
std::unique_ptr<Quantizer> make_quantizer(std::string_view spec, int dim, uint64_t seed = 0);

// The `count` channels with the largest mean square over n sample vectors
// (x: [n, dim]), ascending by index: the outlier channels that a fractional
// format should code with more bits.
std::vector<int> select_outlier_channels(const float* x, size_t n, int dim, int count);

}  // namespace tq

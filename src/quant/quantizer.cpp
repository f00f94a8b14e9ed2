// Quantizer base: batch encode/decode with size checks, the factory, shared
// helpers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "quant/quantizers.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"

namespace tq {

Quantizer::Quantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd)
    : spec_(spec), dim_(dim), seed_(seed), simd_(simd), bytes_(tq::bytes_per_vector(spec, dim)) {}

void Quantizer::encode(std::span<const float> x, std::span<uint8_t> out) const {
  TQ_REQUIRE(x.size() % dim_ == 0, "encode: input has ", x.size(),
             " floats, not a multiple of dim ", dim_);
  const size_t n = x.size() / dim_;
  TQ_REQUIRE(out.size() == n * bytes_, "encode: output buffer has ", out.size(), " bytes, but ", n,
             " vectors of format ", to_string(spec_), " at dim ", dim_, " need ", n * bytes_);
  for (size_t i = 0; i < n; ++i) {
    try {
      encode_one(x.data() + i * dim_, out.data() + i * bytes_);
    } catch (const Error& e) {
      TQ_THROW("encode: vector ", i, ": ", e.what());
    }
  }
}

void Quantizer::decode(std::span<const uint8_t> in, std::span<float> x) const {
  TQ_REQUIRE(in.size() % bytes_ == 0, "decode: input has ", in.size(),
             " bytes, not a multiple of the record size ", bytes_, " (format ", to_string(spec_),
             ", dim ", dim_, ")");
  const size_t n = in.size() / bytes_;
  TQ_REQUIRE(x.size() == n * dim_, "decode: output has ", x.size(), " floats, but ", n,
             " vectors of dim ", dim_, " need ", n * dim_);
  for (size_t i = 0; i < n; ++i) decode_one(in.data() + i * bytes_, x.data() + i * dim_);
}

std::unique_ptr<Quantizer> make_quantizer(const FormatSpec& spec, int dim,
                                          const QuantizerOptions& opt) {
  validate_format(spec, dim);
  const SimdLevel simd = opt.simd ? *opt.simd : simd_level();
  TQ_REQUIRE(opt.hi_channels.empty() || is_split(spec),
             "hi_channels given, but format ", to_string(spec), " has no channel split");
  switch (spec.method) {
    case Method::mse:
      if (is_split(spec)) return std::make_unique<quant::SplitQuantizer>(spec, dim, opt, simd);
      return std::make_unique<quant::MseQuantizer>(spec, dim, opt.seed, simd);
    case Method::prod: return std::make_unique<quant::ProdQuantizer>(spec, dim, opt.seed, simd);
    case Method::polar: return std::make_unique<quant::PolarQuantizer>(spec, dim, opt.seed, simd);
    case Method::q8_0:
    case Method::q4_0: return std::make_unique<quant::BlockQuantizer>(spec, dim, opt.seed, simd);
    case Method::f32:
    case Method::f16:
    case Method::bf16: return std::make_unique<quant::DenseQuantizer>(spec, dim, opt.seed, simd);
  }
  TQ_ASSERT(false);
}

std::unique_ptr<Quantizer> make_quantizer(std::string_view spec, int dim, uint64_t seed) {
  QuantizerOptions opt;
  opt.seed = seed;
  return make_quantizer(parse_format(spec), dim, opt);
}

std::vector<int> select_outlier_channels(const float* x, size_t n, int dim, int count) {
  TQ_REQUIRE(dim >= 1 && count >= 0 && count <= dim, "select_outlier_channels: count ", count,
             " must be in 0..", dim);
  std::vector<double> ms(dim, 0.0);
  for (size_t r = 0; r < n; ++r)
    for (int i = 0; i < dim; ++i) ms[i] += double(x[r * dim + i]) * x[r * dim + i];
  std::vector<int> idx(dim);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return ms[a] > ms[b]; });
  idx.resize(count);
  std::sort(idx.begin(), idx.end());
  return idx;
}

namespace quant {

float load_scale(const uint8_t* p, ScaleType t) {
  if (t == ScaleType::f16) return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8)));
  uint32_t u = uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void store_scale(uint8_t* p, float s, ScaleType t) {
  if (t == ScaleType::f16) {
    TQ_REQUIRE(std::fabs(s) <= kHalfMax, "scale ", s,
               " does not fit fp16 (max 65504); use a format with sf=f32");
    const uint16_t h = float_to_half(s);
    p[0] = static_cast<uint8_t>(h);
    p[1] = static_cast<uint8_t>(h >> 8);
  } else {
    uint32_t u;
    std::memcpy(&u, &s, 4);
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(u >> (8 * i));
  }
}

float checked_norm(const kernels::Kernels& k, const float* x, int dim) {
  const float ss = k.sum_squares(x, dim);
  if (std::isfinite(ss)) return std::sqrt(ss);
  for (int i = 0; i < dim; ++i)
    TQ_REQUIRE(std::isfinite(x[i]), "component ", i, " is ", x[i], " (NaN/Inf cannot be encoded)");
  TQ_THROW("squared norm overflows float (components up to ",
           *std::max_element(x, x + dim, [](float a, float b) { return std::fabs(a) < std::fabs(b); }),
           ")");
}

}  // namespace quant
}  // namespace tq

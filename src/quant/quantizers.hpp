// Internal: the concrete quantizers behind make_quantizer().
#pragma once

#include <vector>

#include "kernels/attn_kernels.hpp"
#include "kernels/kernels.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/quantizer.hpp"
#include "turboquant/rotation.hpp"

namespace tq::quant {

// Reads/writes a scale stored as fp16 or f32 (little-endian, unaligned).
float load_scale(const uint8_t* p, ScaleType t);
// Throws tq::Error if s does not fit the storage type (fp16 max 65504).
void store_scale(uint8_t* p, float s, ScaleType t);
// sqrt of the canonical sum of squares; throws tq::Error naming the first
// NaN/Inf component, or an overflow of the squared norm.
float checked_norm(const kernels::Kernels& k, const float* x, int dim);

// Rotated-domain b-bit coder: the building block of tq-mse, the MSE stage of
// tq-prod and each half of a channel split. Works on y = R x.
struct MseStage {
  MseStage(const FormatSpec& spec, int dim, int bits, const kernels::Kernels& k);
  // y: [dim] rotated input with norm `norm`; codes: [dim]; c: [dim] scratch
  // that receives the unscaled centroids when `want_centroids` (or when the
  // scale mode needs them). Returns the scale to store.
  float code(const float* y, float norm, uint8_t* codes, float* c, bool want_centroids) const;
  int dim, bits;
  ScaleMode scale_mode;
  const Codebook* cb;
  const kernels::Kernels* k;
};

// Formats whose accumulation domain is "rotated": queries are rotated once,
// records decode without the inverse rotation, finish() un-rotates.
#define TQ_ROTATED_DOMAIN_OVERRIDES                                                   \
  void prepare_queries(const float* q, int g, float* qp) const override {            \
    for (int h = 0; h < g; ++h) rot_.forward(q + size_t(h) * dim(), qp + size_t(h) * dim()); \
  }                                                                                   \
  void finish(const float* acc, int g, float* out) const override {                  \
    for (int h = 0; h < g; ++h) rot_.inverse(acc + size_t(h) * dim(), out + size_t(h) * dim()); \
  }

class MseQuantizer final : public Quantizer {
 public:
  MseQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  TQ_ROTATED_DOMAIN_OVERRIDES
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;
  // Rotated-domain reconstruction (scale applied): out: [dim]
  void decode_rotated(const uint8_t* rec, float* out) const;
  const Rotation& rotation() const { return rot_; }

 protected:
  void decode_domain(const uint8_t* rec, float* out) const override { decode_rotated(rec, out); }

 private:
  const kernels::Kernels& k_;
  Rotation rot_;
  MseStage stage_;
  size_t codes_bytes_;
};

class SplitQuantizer final : public Quantizer {
 public:
  SplitQuantizer(const FormatSpec& spec, int dim, const QuantizerOptions& opt, SimdLevel simd);
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  const std::vector<int>& hi_channels() const { return hi_; }
  // The two tq-mse quantizers over the hi channels (the record's first
  // sub-record) and over the rest (ascending; the second).
  const MseQuantizer& hi_part() const { return *qhi_; }
  const MseQuantizer& lo_part() const { return *qlo_; }
  // Domain: [hi channels rotated | lo channels rotated].
  void prepare_queries(const float* q, int g, float* qp) const override;
  void finish(const float* acc, int g, float* out) const override;
  // Each half scores with its own (fused) MSE kernels.
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;

 protected:
  void decode_domain(const uint8_t* rec, float* out) const override;

 private:
  std::vector<int> hi_, lo_;
  std::unique_ptr<MseQuantizer> qhi_, qlo_;
};

class ProdQuantizer final : public Quantizer {
 public:
  ProdQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  double qjl_constant() const { return c_; }
  // Query: [R q | S R q]; accumulator: [rotated part | sketch-domain part].
  size_t query_floats() const override { return size_t(dim()) + m_; }
  size_t acc_floats() const override { return size_t(dim()) + m_; }
  void prepare_queries(const float* q, int g, float* qp) const override;
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;
  void finish(const float* acc, int g, float* out) const override;

 private:
  struct Fields {
    float scale = 0.0f;       // MSE-stage scale (0 without a stage)
    float qjl_factor = 0.0f;  // c * |r|
  };
  Fields read_record(const uint8_t* rec, uint8_t* signs, float* c) const;

  const kernels::Kernels& k_;
  Rotation rot_;
  int bits_, m_;
  std::unique_ptr<MseStage> stage_;  // null when bits == 1 (pure QJL)
  std::vector<float> s_cols_;        // S column by column: [dim, m]
  std::vector<float> st_cols_;       // S^T column by column: [m, dim]
  double c_;                         // estimator constant matched to S
  size_t codes_bytes_, sketch_bytes_;
};

class PolarQuantizer final : public Quantizer {
 public:
  PolarQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  PolarQuantizer(const PolarQuantizer&) = delete;  // layout_ points into this object's tables
  PolarQuantizer& operator=(const PolarQuantizer&) = delete;
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  TQ_ROTATED_DOMAIN_OVERRIDES
  // Blocks of records decoded by the SIMD kernel (decode_polar), then the
  // dense f32 score / accumulate kernels on the block.
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;

 protected:
  void decode_domain(const uint8_t* rec, float* out) const override;

 private:
  void decode_block(const uint8_t* recs, size_t stride, size_t n, float* out) const;
  template <class F>
  void each_block(int g, const uint8_t* recs, size_t stride, size_t n, F&& fn) const;

  const kernels::Kernels& k_;
  Rotation rot_;
  int levels_;
  std::vector<const Codebook*> cb_;       // per level
  std::vector<std::vector<float>> cos_, sin_;  // per level, per centroid
  kernels::PolarLayout layout_;  // record layout; points into cos_ / sin_
};

// q8_0 / q4_0: optional rotation, then llama.cpp-style 32-element blocks.
class BlockQuantizer final : public Quantizer {
 public:
  BlockQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  TQ_ROTATED_DOMAIN_OVERRIDES
  // Straight from the blocks where the level has block kernels (attn_kernels.hpp).
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;

 protected:
  void decode_domain(const uint8_t* rec, float* out) const override;

 private:
  Rotation rot_;
};

// f32 / f16 / bf16: the values themselves.
class DenseQuantizer final : public Quantizer {
 public:
  DenseQuantizer(const FormatSpec& spec, int dim, uint64_t seed, SimdLevel simd);
  void encode_one(const float* x, uint8_t* rec) const override;
  void decode_one(const uint8_t* rec, float* x) const override;
  void score(const float* qp, int g, const uint8_t* recs, size_t stride, size_t n,
             float* scores) const override;
  void accumulate(const float* w, int g, const uint8_t* recs, size_t stride, size_t n,
                  float* acc) const override;
};

}  // namespace tq::quant

// The GPU KV layer against the CPU reference (issue 5): quantize-append codes
// bit-identical to the CPU quantizer (every head_dim, bit width and input
// type; values exactly on boundaries; KvCache's bytes for f32 input); decode attention within 1e-3 (normalised
// error) of the CPU's attention over the same records, for both decode kernels
// (the reference, and the tensor-core one that fp16 rounding of queries,
// centroids and weights keeps a few 1e-4 away). Every test skips when there
// is no CUDA device, or the library was built without CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/kernels.hpp"
#include "cuda/mse_append.hpp"
#include "kernels/kernels.hpp"
#include "quant/quantizers.hpp"
#include "test_util.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/cuda_bench.hpp"
#include "turboquant/error.hpp"
#include "turboquant/half.hpp"
#include "turboquant/kv_cache.hpp"
#include "turboquant/quantizer.hpp"
#include "turboquant/record_attention.hpp"

namespace tq {
namespace {

#define TQ_SKIP_WITHOUT_GPU()                                                   \
  do {                                                                          \
    if (!cuda::cuda_available()) GTEST_SKIP() << "no CUDA device: GPU tests skipped"; \
  } while (0)

using test::norm_err;

// Gaussian vectors with magnitudes spread over 1e-6 .. 1e1 (fp16 scales from
// subnormal to large), a few exact zero vectors and one huge channel in some.
std::vector<float> awkward_vectors(size_t n_vec, int d, uint64_t seed) {
  std::vector<float> x = test::random_gaussian(n_vec * d, seed);
  for (size_t r = 0; r < n_vec; ++r) {
    float* v = &x[r * d];
    if (r % 23 == 7) {
      std::fill(v, v + d, 0.0f);
      continue;
    }
    const float mag = std::pow(10.0f, static_cast<float>(int(r % 8) - 6));  // norms < 65504
    for (int i = 0; i < d; ++i) v[i] *= mag;
    if (r % 5 == 1) v[r % d] *= 40.0f;
  }
  return x;
}

// K/V with realistic structure: a few large channels and non-zero means.
std::vector<float> kv_data(size_t n, int d, uint64_t seed) {
  std::vector<float> x = test::random_gaussian(n * d, seed);
  for (size_t i = 0; i < x.size(); ++i) {
    const int c = static_cast<int>(i % d);
    if (c % 17 == 3) x[i] = 6.0f * x[i] + 2.0f;
    else x[i] += 0.3f;
  }
  return x;
}

// Rows kb, vb (f32) as input of type dtype: uploaded to bk, bv in dtype and
// to fk, fv as the f32 values that input holds (kb, vb become those values).
void upload_typed_rows(std::vector<float>& kb, std::vector<float>& vb, cuda::DType dtype, cuda::DeviceBuffer& bk,
                       cuda::DeviceBuffer& bv, cuda::DeviceBuffer& fk, cuda::DeviceBuffer& fv) {
  if (dtype != cuda::DType::f32) {
    const bool bf = dtype == cuda::DType::bf16;
    std::vector<uint16_t> hk(kb.size()), hv(vb.size());
    for (size_t i = 0; i < kb.size(); ++i) {
      hk[i] = bf ? float_to_bf16(kb[i]) : float_to_half(kb[i]);
      hv[i] = bf ? float_to_bf16(vb[i]) : float_to_half(vb[i]);
      kb[i] = bf ? bf16_to_float(hk[i]) : half_to_float(hk[i]);
      vb[i] = bf ? bf16_to_float(hv[i]) : half_to_float(hv[i]);
    }
    bk.upload(hk.data(), hk.size() * 2);
    bv.upload(hv.data(), hv.size() * 2);
  } else {
    bk.upload(kb.data(), kb.size() * 4);
    bv.upload(vb.data(), vb.size() * 4);
  }
  fk.upload(kb.data(), kb.size() * 4);
  fv.upload(vb.data(), vb.size() * 4);
}

// The pages of a sequence, downloaded.
using HostSeqPages = std::vector<std::vector<uint8_t>>;
HostSeqPages download_pages(const cuda::GpuKvLayer& layer, int seq) {
  HostSeqPages p(layer.n_pages(seq));
  for (size_t i = 0; i < p.size(); ++i) {
    p[i].resize(layer.page_bytes());
    layer.download_page(seq, int(i), p[i].data());
  }
  return p;
}

// Every record of tokens [t0, t1) of a sequence against the CPU encoding of
// the rows of k, v (from token t0 on), rounded first to the layer's
// round_to format as the GPU rounds them (KvCache's dense format). k, v: the
// float values of the input as given (f16 / bf16 input: its exact values).
// Returns the mismatches; the first few are reported with the whole case.
float round_to_format(float x, cuda::DType t) {
  switch (t) {
    case cuda::DType::f32: return x;
    case cuda::DType::f16: return half_to_float(float_to_half(x));
    case cuda::DType::bf16: return bf16_to_float(float_to_bf16(x));
  }
  return x;
}

int compare_records(const cuda::GpuKvLayer& layer, int seq, const Quantizer& kq,
                    const Quantizer& vq, const float* k, const float* v, int t0, int t1,
                    const std::string& what) {
  const int H = layer.config().n_heads_kv, P = layer.config().page_tokens, d = layer.head_dim();
  const cuda::DType rt = layer.config().round_to;
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  std::vector<uint8_t> page(layer.page_bytes()), ref_k(kb), ref_v(vb);
  std::vector<float> xk(d), xv(d);
  int bad = 0, loaded = -1;
  for (int t = t0; t < t1; ++t) {
    if (t / P != loaded) {
      loaded = t / P;
      layer.download_page(seq, loaded, page.data());
    }
    for (int h = 0; h < H; ++h) {
      const size_t row = size_t(t - t0) * H + h;
      for (int i = 0; i < d; ++i) {
        xk[i] = round_to_format(k[row * d + i], rt);
        xv[i] = round_to_format(v[row * d + i], rt);
      }
      kq.encode_one(xk.data(), ref_k.data());
      vq.encode_one(xv.data(), ref_v.data());
      const uint8_t* gk = page.data() + (size_t(h) * P + t % P) * kb;
      const uint8_t* gv = page.data() + size_t(P) * H * kb + (size_t(h) * P + t % P) * vb;
      for (auto [g, r, n, name] : {std::tuple{gk, ref_k.data(), kb, "K"},
                                   std::tuple{gv, ref_v.data(), vb, "V"}})
        if (std::memcmp(g, r, n) != 0) {
          if (bad++ < 5) {
            size_t i = 0;
            while (g[i] == r[i]) ++i;
            ADD_FAILURE() << what << ": " << name << " record of token " << t << " head " << h
                          << " differs at byte " << i << " of " << n << ": GPU " << int(g[i])
                          << " CPU " << int(r[i]) << " (round_to " << cuda::to_string(rt) << ")";
          }
        }
    }
  }
  return bad;
}

// An input in one of the GPU layer's element types: its bytes, and the float
// values those bytes hold (what the CPU reference encodes).
struct TypedInput {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};
TypedInput typed_input(const std::vector<float>& x, cuda::DType t) {
  TypedInput r;
  r.values.resize(x.size());
  r.bytes.resize(x.size() * cuda::dtype_bytes(t));
  for (size_t i = 0; i < x.size(); ++i) {
    if (t == cuda::DType::f32) {
      r.values[i] = x[i];
      std::memcpy(&r.bytes[4 * i], &x[i], 4);
      continue;
    }
    const uint16_t h = t == cuda::DType::f16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
    r.values[i] = t == cuda::DType::f16 ? half_to_float(h) : bf16_to_float(h);
    std::memcpy(&r.bytes[2 * i], &h, 2);
  }
  return r;
}

// awkward_vectors plus rows at the fp16 limit (one component of +-65280,
// representable in f16 and bf16: norm 65280 <= 65504) and rows with exact
// zero components.
std::vector<float> append_vectors(size_t n_vec, int d, uint64_t seed) {
  std::vector<float> x = awkward_vectors(n_vec, d, seed);
  for (size_t r = 0; r < n_vec; ++r) {
    float* v = &x[r * d];
    if (r % 29 == 13) {
      std::fill(v, v + d, 0.0f);
      v[r % d] = r % 2 ? -65280.0f : 65280.0f;
    } else if (r % 31 == 5) {
      for (int i = 0; i < d; i += 2) v[i] = 0.0f;
    }
  }
  return x;
}

// Where a windowed attend's splits start (host and device share
// decode_split_start) and how many tokens they may cover
// (decode_split_span_cap, which sizes n_splits once for any later length):
// no visible token is ever before the start, the start keeps 32-token pair
// alignment, and what follows it fits the span. Host arithmetic: runs
// without a GPU.
TEST(CudaPlan, WindowSplitsCoverEveryVisibleToken) {
  cuda::DecodeAttentionParams p;
  p.page_tokens = 48;
  p.max_pages_per_seq = 70;  // capacity 3360 tokens
  const long cap = long(p.max_pages_per_seq) * p.page_tokens;
  for (const int sinks : {0, 2})
    for (const int wt : {0, 8})
      for (const int w : {1, 16, 31, 32, 33, 300, 1024, 5000}) {
        p.window = w;
        p.window_tail = wt;
        p.n_sinks = sinks;
        const long span = cuda::decode_split_span_cap(p);
        for (int len = 0; len <= int(cap); ++len) {
          SCOPED_TRACE("len " + std::to_string(len) + " window " + std::to_string(w) + " tail " +
                       std::to_string(wt) + " sinks " + std::to_string(sinks));
          const int start = cuda::decode_split_start(len, w, wt, sinks);
          ASSERT_EQ(start % 32, 0);
          ASSERT_GE(start, 0);
          if (sinks > 0) ASSERT_EQ(start, 0);  // the sinks are at the start
          const int first_visible = std::max(0, len + wt - w);  // page index of the window's first key
          ASSERT_LE(start, std::max(first_visible, 0));
          ASSERT_LE(long(len) - std::min(start, len), span);
        }
      }
  p.window = 0;
  EXPECT_EQ(cuda::decode_split_span_cap(p), cap);
  EXPECT_EQ(cuda::decode_split_start(1000, 0, 0, 0), 0);
}

// The split cost model's candidates (host plan and device plan share them):
// s_min, then every row count above it with at most 5 significant bits, up
// to the rows of the longest span; the j-th found without walking the list.
// Host arithmetic: runs without a GPU.
TEST(CudaPlan, SplitCandidatesAreOrderedAndIndexed) {
  int prev = 0;
  for (int j = 0; j < 360; ++j) {  // (rows up to 2^26: any split of an int token count)
    const int r = cuda::decode_split_rows(j);
    ASSERT_GT(r, prev) << "j " << j;
    int sig = r;
    while (sig >= 32) {
      ASSERT_EQ(sig % 2, 0) << "rows " << r << " has more than 5 significant bits";
      sig /= 2;
    }
    if (j > 0) ASSERT_LE(r - prev, std::max(1, prev / 16)) << "candidates more than 1/16 apart at " << r;
    prev = r;
  }
  for (int r = 1; r < 200000; ++r) {
    const int j = cuda::decode_split_rows_after(r);
    ASSERT_GT(cuda::decode_split_rows(j), r);
    if (j > 0) ASSERT_LE(cuda::decode_split_rows(j - 1), r);
  }
  for (const int unit : {256, 512})
    for (const int rows_min : {1, 7, 8, 33, 100})
      for (const int l_max : {0, 1, 511, 512, 4097, 131072, 1000000, 1 << 30}) {
        SCOPED_TRACE("unit " + std::to_string(unit) + " rows_min " + std::to_string(rows_min) + " l_max " +
                     std::to_string(l_max));
        const long rows_max = (long(l_max) + unit - 1) / unit;
        const int n = cuda::decode_split_candidates(rows_min, l_max, unit);
        ASSERT_GE(n, 1);
        EXPECT_EQ(cuda::decode_split_candidate(0, rows_min), rows_min);
        for (int i = 1; i < n; ++i) {
          ASSERT_GT(cuda::decode_split_candidate(i, rows_min), cuda::decode_split_candidate(i - 1, rows_min));
          ASSERT_LE(cuda::decode_split_candidate(i, rows_min), rows_max);
        }
        // The list stops at the first candidate past the longest span.
        if (rows_max > rows_min) EXPECT_GT(cuda::decode_split_candidate(n, rows_min), rows_max);
      }
  EXPECT_EQ(cuda::decode_split_cost(264, 132, 1024, 512), 2LL * 1536);
  EXPECT_EQ(cuda::decode_split_cost(265, 132, 1024, 512), 3LL * 1536);
}

TEST(Cuda, DeviceQuery) {
  TQ_SKIP_WITHOUT_GPU();
  EXPECT_GT(cuda::cuda_device_count(), 0);
  const std::string name = cuda::cuda_device_name(0);
  EXPECT_FALSE(name.empty());
  std::printf("CUDA device 0: %s\n", name.c_str());
}

// The append kernels' table search (host side, no GPU needed): for every
// codebook of 1-5 bits at dims 8..256 (a split's segments included), both
// laws, the code the kernels read from the table -- the cell of v as the
// device computes it (the bits of fma(v, 2^s, 1.5 * 2^23), clamped to 32
// lanes), then the base count and the cell's one or two boundaries -- is
// the CPU's count of boundaries below v, for each boundary, the floats
// beside it, each cell edge and beside it, 0, +-inf and huge values; and
// 1-4 bits always get a one-boundary table (the split append kernel needs
// that for turbo2.5 / turbo3.5, else a slower kernel runs).
TEST(CudaAppend, SearchTableCodesEqualBinarySearch) {
  constexpr float kMagic = 12582912.0f;
  constexpr int kMagicBits = 0x4B400000;
  int checked = 0;
  for (CodebookLaw law : {CodebookLaw::exact, CodebookLaw::gauss})
    for (int d : {8, 32, 56, 64, 112, 128, 256})
      for (int bits = 1; bits <= 5; ++bits) {
        const auto& bnd = sphere_codebook(law, d, bits).boundaries;
        const cuda::SearchTable t = cuda::search_table(bnd, bits);
        SCOPED_TRACE("law " + to_string(law) + " d " + std::to_string(d) + " bits " + std::to_string(bits));
        if (bits <= 4) EXPECT_EQ(int(t.search), int(cuda::AppendSearch::table1));
        if (t.search == cuda::AppendSearch::binary) continue;
        std::vector<float> vs = {0.0f, -0.0f, INFINITY, -INFINITY, 3e38f, -3e38f, 1e9f, -1e9f};
        for (float b : bnd)
          for (float v : {b, std::nextafter(b, -INFINITY), std::nextafter(b, INFINITY)}) vs.push_back(v);
        for (int c = -17; c <= 16; ++c) {
          const float e = (c + 0.5f) / t.cell_scale;
          for (float v : {e, std::nextafter(e, -INFINITY), std::nextafter(e, INFINITY)}) vs.push_back(v);
        }
        for (float v : vs) {
          int want = 0;
          for (float b : bnd) want += b < v ? 1 : 0;
          float f = std::fma(v, t.cell_scale, kMagic);
          int32_t bitsf;
          std::memcpy(&bitsf, &f, 4);
          const int lane = std::clamp(bitsf - kMagicBits + 16, 0, 31);  // __viaddmin_s32_relu
          const int got = t.base[lane] + (t.b0[lane] < v ? 1 : 0) + (t.b1[lane] < v ? 1 : 0);
          EXPECT_EQ(got, want) << "v " << v;
          ++checked;
        }
      }
  std::printf("table codes checked: %d values\n", checked);
}

// Every head_dim, bit width 1..8 (K and V different), scale f16 / f32 and
// both codebook laws, every input type with every rounding the layer offers;
// host appends in odd chunks across page boundaries and a device append.
TEST(CudaAppend, CodesBitIdenticalAllWidthsDimsInputTypes) {
  TQ_SKIP_WITHOUT_GPU();
  using cuda::DType;
  const int H = 3, P = 16;
  const std::pair<DType, DType> kinds[] = {  // (input, round_to)
      {DType::f32, DType::f16}, {DType::f32, DType::f32}, {DType::f32, DType::bf16},
      {DType::f16, DType::f16}, {DType::f16, DType::bf16}, {DType::bf16, DType::f16},
      {DType::bf16, DType::bf16}};
  int total_bad = 0;
  for (int d : {64, 128, 256})
    for (int kbits = 1; kbits <= 8; ++kbits) {
      const int vbits = kbits % 8 + 1;
      const std::string extra = kbits % 3 == 0 ? ",sf=f32" : kbits % 4 == 1 ? ",cb=gauss" : "";
      const std::string ks = "tq-mse:b=" + std::to_string(kbits) + extra;
      const std::string vs = "tq-mse:b=" + std::to_string(vbits) + extra;
      const uint64_t seed = 1000 + d + kbits;
      auto kq = make_quantizer(ks, d, seed), vq = make_quantizer(vs, d, seed + 1);
      const int n_host = 33, n_dev = 54;
      const auto k = append_vectors(size_t(n_host + n_dev) * H, d, seed * 7);
      const auto v = append_vectors(size_t(n_host + n_dev) * H, d, seed * 7 + 1);
      for (const auto [in, rt] : kinds) {
        const std::string what = ks + " / " + vs + " d " + std::to_string(d) + " input " +
                                 cuda::to_string(in) + " round_to " + cuda::to_string(rt) +
                                 " seed " + std::to_string(seed);
        SCOPED_TRACE(what);
        const TypedInput tk = typed_input(k, in), tv = typed_input(v, in);
        const size_t eb = cuda::dtype_bytes(in), row = size_t(H) * d;
        cuda::GpuKvLayerConfig cfg;
        cfg.n_heads_kv = H;
        cfg.page_tokens = P;
        cfg.max_seqs = 2;
        cfg.max_pages_per_seq = 8;
        cfg.round_to = rt;
        cuda::GpuKvLayer layer(*kq, *vq, cfg);
        const int s0 = layer.add_sequence(), s1 = layer.add_sequence();
        int t = 0;
        for (int chunk : {1, 30, 2}) {  // 33 tokens, across two page boundaries
          layer.append(s0, tk.bytes.data() + t * row * eb, tv.bytes.data() + t * row * eb, chunk, in);
          t += chunk;
        }
        const size_t rest = size_t(n_dev) * row * eb;
        cuda::DeviceBuffer dk(rest), dv(rest);
        dk.upload(tk.bytes.data() + n_host * row * eb, rest);
        dv.upload(tv.bytes.data() + n_host * row * eb, rest);
        layer.append_device(s1, dk.data(), dv.data(), n_dev, in);
        ASSERT_EQ(layer.n_tokens(s0), n_host);
        ASSERT_EQ(layer.n_tokens(s1), n_dev);
        ASSERT_EQ(layer.k_record_bytes(), kq->bytes_per_vector());
        total_bad += compare_records(layer, s0, *kq, *vq, tk.values.data(), tv.values.data(), 0,
                                     n_host, what);
        total_bad += compare_records(layer, s1, *kq, *vq, tk.values.data() + n_host * row,
                                     tv.values.data() + n_host * row, 0, n_dev, what);
      }
    }
  EXPECT_EQ(total_bad, 0);
}

// Inputs whose rotated, normalised coordinate 0 (v_0 = y_0 * (1 / norm), as
// MseQuantizer::encode_one computes it) is exactly a given float. With
// x = signs * u the rotation's FWHT sees u, and two families of u have a
// coordinate 0 that is one rounding of a free parameter p:
//   small |v| (< 0.9 / sqrt(dim)): u = (1, -1, 1, -1, p, 0, ...): y_0 = p;
//   large |v|: u = (1 x m, p, 0, ...), m = dim / 4: y_0 = fl(m + p).
// p comes from the real-valued equation, then a scan over neighbouring floats
// finds an exact hit (the candidate is checked through the CPU's rotation).
bool input_hitting(const quant::MseQuantizer& q, float target, std::vector<float>& x) {
  const int d = q.dim(), m = d / 4;
  const double ps = 1.0 / std::sqrt(double(d));
  const float psf = 1.0f / std::sqrt(static_cast<float>(d));
  const float T = std::fabs(target);
  std::vector<float> u(d, 0.0f);
  int at;      // index of p in u
  double p0;   // the real solution
  float off;   // y_0 = fl(off + p) * ps
  if (T < 0.9 * ps) {
    u[0] = u[2] = 1.0f;
    u[1] = u[3] = -1.0f;
    at = 4;
    off = 0.0f;
    p0 = 2.0 * T / std::sqrt(ps * ps - double(T) * T);  // p ps / sqrt(4 + p^2) = T
  } else {
    if (!(double(T) < ps * std::sqrt(double(m + 1)) * 0.999)) return false;
    std::fill(u.begin(), u.begin() + m, 1.0f);
    at = m;
    off = float(m);
    double lo = -m, hi = 1;  // (m + p) ps / sqrt(m + p^2) rises from 0 to its maximum here
    for (int it = 0; it < 200; ++it) {
      const double mid = 0.5 * (lo + hi);
      ((m + mid) / std::sqrt(m + mid * mid) * ps < T ? lo : hi) = mid;
    }
    p0 = lo;
  }
  auto v0 = [&](float p) {
    u[at] = p;
    const float mul = 1.0f / std::sqrt(kernels::kernels_ref().sum_squares(u.data(), d));
    const float y = (off + p) * psf;
    return y * mul;
  };
  float up = static_cast<float>(p0), down = up;
  for (int step = 0; step < 4000; ++step) {
    for (float p : {up, down}) {
      if (v0(p) != T) continue;
      u[at] = p;
      const auto& signs = q.rotation().stages()[0].signs;
      x.resize(d);
      for (int i = 0; i < d; ++i) x[i] = (target < 0 ? -u[i] : u[i]) * signs[i];
      // The same through the CPU encoder's own rotation (the check of the above).
      std::vector<float> y(d);
      q.rotation().forward(x.data(), y.data());
      const float mul = 1.0f / std::sqrt(kernels::kernels_ref().sum_squares(x.data(), d));
      return y[0] * mul == target;
    }
    up = std::nextafter(up, 1e30f);
    down = std::nextafter(down, -1e30f);
  }
  return false;
}

// Rotated coordinates exactly on a boundary (the code counts boundaries
// strictly below), one float either side, exactly on the edges of the
// append kernel's table cells (v * 2^s = k + 1/2, a rounding tie) and 0.
TEST(CudaAppend, ValuesOnBoundariesAndTableCellEdges) {
  TQ_SKIP_WITHOUT_GPU();
  int total_bad = 0;
  for (int d : {64, 128, 256})
    for (int bits : {1, 2, 3, 4, 5, 8}) {
      const std::string spec = "tq-mse:b=" + std::to_string(bits) + ",sf=f32";
      auto q = make_quantizer(spec, d, 500 + bits);  // K and V alike: both see the hits
      const auto* mq = dynamic_cast<const quant::MseQuantizer*>(q.get());
      ASSERT_NE(mq, nullptr);
      const auto& bnd = sphere_codebook(CodebookLaw::exact, d, bits).boundaries;
      std::vector<float> targets = {0.0f};
      const size_t stride = std::max<size_t>(1, bnd.size() / 12);
      for (size_t i = 0; i < bnd.size(); i += stride)
        for (float b : {bnd[i], std::nextafter(bnd[i], -1.0f), std::nextafter(bnd[i], 1.0f)})
          targets.push_back(b);
      cuda::MseDeviceFormat f;
      f.dim = d;
      f.bits = bits;
      const cuda::AppendFormat af =
          cuda::append_format(f, mq->rotation().stages()[0].signs, bnd);
      if (af.tab.search != cuda::AppendSearch::binary)
        for (int c = -16; c < 16; c += 3) targets.push_back((c + 0.5f) / af.tab.cell_scale);
      std::vector<float> rows, x;
      for (float t : targets)
        if (input_hitting(*mq, t, x)) rows.insert(rows.end(), x.begin(), x.end());
      const int n = int(rows.size() / d);
      const std::string what = spec + " d " + std::to_string(d) + ": " + std::to_string(n) +
                               " of " + std::to_string(targets.size()) + " targets hit";
      SCOPED_TRACE(what);
      EXPECT_GE(2 * n, int(targets.size())) << "too few exact hits constructed";
      cuda::GpuKvLayerConfig cfg;
      cfg.page_tokens = 16;
      cfg.max_pages_per_seq = (n + 15) / 16 + 1;
      cfg.round_to = cuda::DType::f32;  // the hits are f32 values
      cuda::GpuKvLayer layer(*q, *q, cfg);
      layer.add_sequence();
      layer.append(0, rows.data(), rows.data(), n);
      total_bad += compare_records(layer, 0, *q, *q, rows.data(), rows.data(), 0, n, what);
    }
  EXPECT_EQ(total_bad, 0);
}

// The GPU layer's default (round_to f16) on raw f32 input, not pre-rounded,
// writes the records KvCache::append writes (it rounds each token to its f16
// dense format first): decoded, they equal KvCache::dequantize bit for bit.
TEST(CudaAppend, F32InputMatchesKvCacheRecords) {
  TQ_SKIP_WITHOUT_GPU();
  for (int d : {64, 128, 256}) {
    SCOPED_TRACE("head_dim " + std::to_string(d));
    KvCacheConfig cc;
    cc.n_layers = 1;
    cc.n_heads_kv = 2;
    cc.head_dim = d;
    cc.k_format = parse_format("tq-mse:b=4");
    cc.v_format = parse_format("tq-mse:b=3");
    cc.page_tokens = 16;
    cc.seed = 11 + d;
    KvCache cache(cc);
    const int H = cc.n_heads_kv;
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = H;
    cfg.page_tokens = cc.page_tokens;
    cfg.max_pages_per_seq = 8;
    ASSERT_EQ(cfg.round_to, cuda::DType::f16);  // the default, as KvCacheConfig's dense_format
    cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    const int n = 97;
    auto k = append_vectors(size_t(n) * H, d, 300 + d), v = kv_data(size_t(n) * H, d, 400 + d);
    ASSERT_EQ(cache.add_sequence(), 0);
    cache.append(0, 0, k.data(), v.data(), n);
    layer.add_sequence();
    layer.append(0, k.data(), v.data(), 40);
    layer.append(0, k.data() + size_t(40) * H * d, v.data() + size_t(40) * H * d, n - 40);
    std::vector<float> ck(size_t(n) * H * d), cv(ck.size()), gk(ck.size()), gv(ck.size());
    cache.dequantize(0, 0, ck.data(), cv.data());
    const HostSeqPages pages = download_pages(layer, 0);
    const size_t kb = layer.k_record_bytes(), vb = layer.v_record_bytes();
    const int P = cfg.page_tokens;
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < H; ++h) {
        const uint8_t* base = pages[t / P].data();
        const size_t row = (size_t(t) * H + h) * d;
        cache.k_quantizer(0).decode_one(base + (size_t(h) * P + t % P) * kb, gk.data() + row);
        cache.v_quantizer(0).decode_one(base + size_t(P) * H * kb + (size_t(h) * P + t % P) * vb,
                                        gv.data() + row);
      }
    EXPECT_EQ(std::memcmp(gk.data(), ck.data(), ck.size() * 4), 0) << "K differs from KvCache";
    EXPECT_EQ(std::memcmp(gv.data(), cv.data(), cv.size() * 4), 0) << "V differs from KvCache";
    EXPECT_EQ(compare_records(layer, 0, cache.k_quantizer(0), cache.v_quantizer(0), k.data(),
                              v.data(), 0, n, "vs KvCache, d " + std::to_string(d)),
              0);
  }
}

// Odd counts appended one after another (the shared awkward lengths), page
// sizes 256, 16 and 5 (page boundaries inside tiles), one head, many heads,
// and more heads than a tile holds (head chunks: 130 heads at head_dim 64).
TEST(CudaAppend, OddCountsPageBoundariesAndHeadChunks) {
  TQ_SKIP_WITHOUT_GPU();
  struct Case {
    int d, H, P;
    cuda::DType in;
  };
  const Case cases[] = {{128, 8, 256, cuda::DType::bf16}, {128, 8, 16, cuda::DType::f32},
                        {64, 130, 5, cuda::DType::bf16}, {256, 1, 16, cuda::DType::bf16},
                        {256, 3, 7, cuda::DType::f16},   {64, 2, 256, cuda::DType::f32}};
  int total = 0;
  for (int n : test::kAwkwardLengths) total += n;
  int total_bad = 0;
  for (const Case& c : cases) {
    const std::string what = "d " + std::to_string(c.d) + " heads " + std::to_string(c.H) +
                             " page " + std::to_string(c.P) + " input " + cuda::to_string(c.in);
    SCOPED_TRACE(what);
    auto kq = make_quantizer("tq-mse:b=4", c.d, 21), vq = make_quantizer("tq-mse:b=3", c.d, 22);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = c.H;
    cfg.page_tokens = c.P;
    cfg.max_pages_per_seq = (total + c.P - 1) / c.P;
    cuda::GpuKvLayer layer(*kq, *vq, cfg);
    layer.add_sequence();
    const size_t row = size_t(c.H) * c.d;
    const TypedInput tk = typed_input(kv_data(total * row / c.d, c.d, 31), c.in);
    const TypedInput tv = typed_input(append_vectors(total * row / c.d, c.d, 32), c.in);
    const size_t eb = cuda::dtype_bytes(c.in);
    cuda::DeviceBuffer dk(tk.bytes.size()), dv(tv.bytes.size());
    dk.upload(tk.bytes.data(), tk.bytes.size());
    dv.upload(tv.bytes.data(), tv.bytes.size());
    int t = 0;
    for (int n : test::kAwkwardLengths) {
      layer.append_device(0, dk.as<uint8_t>() + t * row * eb, dv.as<uint8_t>() + t * row * eb, n,
                          c.in);
      t += n;
    }
    ASSERT_EQ(layer.n_tokens(0), total);
    total_bad += compare_records(layer, 0, *kq, *vq, tk.values.data(), tv.values.data(), 0, total,
                                 what);
  }
  EXPECT_EQ(total_bad, 0);
}

// Device pointers that are not 16-byte aligned (a token offset of an odd
// number of floats / halves) take the copy path and give the same records.
TEST(CudaAppend, MisalignedDevicePointers) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, d = 64, n = 37;
  auto kq = make_quantizer("tq-mse:b=4", d, 5), vq = make_quantizer("tq-mse:b=2", d, 6);
  for (const cuda::DType in : {cuda::DType::f32, cuda::DType::bf16}) {
    SCOPED_TRACE(cuda::to_string(in));
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = H;
    cfg.page_tokens = 16;
    cfg.max_pages_per_seq = 4;
    cuda::GpuKvLayer layer(*kq, *vq, cfg);
    layer.add_sequence();
    const TypedInput tk = typed_input(kv_data(size_t(n) * H, d, 7), in);
    const TypedInput tv = typed_input(kv_data(size_t(n) * H, d, 8), in);
    const size_t shift = cuda::dtype_bytes(in);  // one element: 4 or 2 bytes off
    cuda::DeviceBuffer dk(tk.bytes.size() + 16), dv(tv.bytes.size() + 16);
    std::vector<uint8_t> hk(shift, 0), hv(shift, 0);
    hk.insert(hk.end(), tk.bytes.begin(), tk.bytes.end());
    hv.insert(hv.end(), tv.bytes.begin(), tv.bytes.end());
    dk.upload(hk.data(), hk.size());
    dv.upload(hv.data(), hv.size());
    layer.append_device(0, dk.as<uint8_t>() + shift, dv.as<uint8_t>() + shift, n, in);
    EXPECT_EQ(compare_records(layer, 0, *kq, *vq, tk.values.data(), tv.values.data(), 0, n,
                              "misaligned"),
              0);
  }
}

TEST(CudaAppend, BatchOfDecodeTokensLandsInEachSequence) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, d = 128, P = 16, n_seqs = 5;
  auto kq = make_quantizer("tq-mse:b=4", d, 3), vq = make_quantizer("tq-mse:b=3", d, 4);
  for (const cuda::DType in : {cuda::DType::f32, cuda::DType::bf16}) {
    SCOPED_TRACE(cuda::to_string(in));
    cuda::GpuKvLayerConfig cfg{H, P, n_seqs, 8, 0, 2};
    cuda::GpuKvLayer layer(*kq, *vq, cfg);
    std::vector<std::vector<float>> ks(n_seqs), vs(n_seqs);
    for (int s = 0; s < n_seqs; ++s) {
      layer.add_sequence();
      const int n0 = 15 + s;  // each sequence one token before/after a page boundary
      ks[s] = typed_input(kv_data(size_t(n0 + 1) * H, d, 50 + s), in).values;
      vs[s] = typed_input(kv_data(size_t(n0 + 1) * H, d, 60 + s), in).values;
      layer.append(s, ks[s].data(), vs[s].data(), n0);
    }
    std::vector<int> seqs = {3, 0, 4, 1, 2};
    std::vector<float> bk, bv;
    for (int s : seqs) {
      const size_t off = size_t(15 + s) * H * d;
      bk.insert(bk.end(), ks[s].begin() + off, ks[s].begin() + off + H * d);
      bv.insert(bv.end(), vs[s].begin() + off, vs[s].begin() + off + H * d);
    }
    const TypedInput tk = typed_input(bk, in), tv = typed_input(bv, in);  // exact: values of `in`
    cuda::DeviceBuffer dk(tk.bytes.size()), dv(tv.bytes.size());
    dk.upload(tk.bytes.data(), tk.bytes.size());
    dv.upload(tv.bytes.data(), tv.bytes.size());
    if (in == cuda::DType::f32)
      layer.append_batch_device(seqs.data(), n_seqs, dk.as<float>(), dv.as<float>());
    else
      layer.append_batch_device(seqs.data(), n_seqs, dk.data(), dv.data(), in);
    int bad = 0;
    for (int s = 0; s < n_seqs; ++s) {
      ASSERT_EQ(layer.n_tokens(s), 16 + s);
      bad += compare_records(layer, s, *kq, *vq, ks[s].data(), vs[s].data(), 0, 16 + s,
                             "batch seq " + std::to_string(s));
    }
    EXPECT_EQ(bad, 0);
    EXPECT_THROW(layer.append_batch_device(std::vector<int>{1, 1}.data(), 2, dk.data(), dv.data(), in),
                 Error);
  }
}

TEST(CudaAppend, RefusesNonFiniteAndOverflowLeavingSequenceUnchanged) {
  TQ_SKIP_WITHOUT_GPU();
  const int d = 64;
  auto kq = make_quantizer("tq-mse:b=3", d, 1), vq = make_quantizer("tq-mse:b=3", d, 2);
  cuda::GpuKvLayerConfig cfg;
  cfg.page_tokens = 4;
  cfg.max_pages_per_seq = 4;
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  const int s = layer.add_sequence();
  auto k = kv_data(3, d, 1), v = kv_data(3, d, 2);
  layer.append(s, k.data(), v.data(), 3);
  auto expect_refused = [&](const std::vector<float>& kk, const std::vector<float>& vv, int n,
                            cuda::DType in, const char* what) {
    SCOPED_TRACE(what);
    const TypedInput tk = typed_input(kk, in), tv = typed_input(vv, in);
    EXPECT_THROW(layer.append(s, tk.bytes.data(), tv.bytes.data(), n, in), Error);
    EXPECT_EQ(layer.n_tokens(s), 3);
    EXPECT_EQ(layer.n_pages(s), 1);
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const cuda::DType in : {cuda::DType::f32, cuda::DType::f16, cuda::DType::bf16}) {
    auto bad = kv_data(3, d, 3);
    bad[d + 5] = nan;
    expect_refused(bad, v, 3, in, "NaN");
    bad[d + 5] = -inf;
    expect_refused(bad, v, 3, in, "-inf");
  }
  // |x| > 65504 under round_to f16: KvCache's f16 dense format refuses it.
  auto big = kv_data(2, d, 4);
  big[7] = 70000.0f;
  expect_refused(v, big, 2, cuda::DType::f32, "f32 component > 65504");
  expect_refused(v, big, 2, cuda::DType::bf16, "bf16 component > 65504");
  big[7] = 65510.0f;  // rounds to 65504 in f16, but the dense encoder refuses it first
  expect_refused(v, big, 2, cuda::DType::f32, "f32 component in (65504, 65520)");
  // Scale overflow: every component 10000 (fits f16), norm 80000 > 65504.
  std::vector<float> wide(2 * d, 10000.0f);
  EXPECT_THROW(kq->encode_one(wide.data(), std::vector<uint8_t>(kq->bytes_per_vector()).data()), Error);
  expect_refused(k, wide, 2, cuda::DType::f32, "scale overflow");
  // Capacity: 16 tokens.
  auto many = kv_data(14, d, 5);
  EXPECT_THROW(layer.append(s, many.data(), many.data(), 14), Error);
  layer.append(s, many.data(), many.data(), 13);
  EXPECT_EQ(layer.n_tokens(s), 16);
  EXPECT_EQ(compare_records(layer, s, *kq, *vq, many.data(), many.data(), 3, 16, "after refusals")
            + compare_records(layer, s, *kq, *vq, k.data(), v.data(), 0, 3, "first tokens"), 0);

  // Under round_to f32 a component of 70000 is accepted (sf=f32: no scale limit).
  auto kq32 = make_quantizer("tq-mse:b=3,sf=f32", d, 1), vq32 = make_quantizer("tq-mse:b=3,sf=f32", d, 2);
  cfg.round_to = cuda::DType::f32;
  cuda::GpuKvLayer wide_layer(*kq32, *vq32, cfg);
  wide_layer.add_sequence();
  wide_layer.append(0, big.data(), big.data(), 2);
  EXPECT_EQ(compare_records(wide_layer, 0, *kq32, *vq32, big.data(), big.data(), 0, 2, "round_to f32"), 0);
}

// bench::AppendKernels (the kernels alone, for tq gpu-bench) rewrites the
// same records from the same input.
// append_batch_device_async: decode steps without a readback give the same
// layer as the synchronous calls; a refusal found on the device (a NaN)
// drops that call and every later asynchronous one on the device (attention
// unchanged), is thrown by check_appends() or by the next synchronous call,
// and leaves the layer as it was before the refused call, ready for more.
TEST(CudaAppend, AsyncBatchMatchesSyncAndRefusalIsStickyThenRecovered) {
  TQ_SKIP_WITHOUT_GPU();
  for (const int window : {0, 6}) {
    SCOPED_TRACE("dense window " + std::to_string(window));
    KvCacheConfig cc = KvCacheConfig::from_preset("turbo4", 1, 2, 128);
    KvCache cache(cc);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = 2;
    cfg.page_tokens = 16;
    cfg.max_seqs = 3;
    cfg.max_pages_per_seq = 8;
    cfg.dense_window = window;
    cfg.dense_prefix = window > 0 ? 2 : 0;
    cuda::GpuKvLayer sync_layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    cuda::GpuKvLayer async_layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    const int H = 2, d = 128, hq = 8, steps = 40;
    const size_t row = size_t(H) * d;
    const std::vector<int> prompt = {5, 17, 30};
    const auto k = kv_data(size_t(3) * (30 + steps) * H, d, 71), v = kv_data(size_t(3) * (30 + steps) * H, d, 72);
    auto tok = [&](const std::vector<float>& x, int s, int t) { return x.data() + (size_t(s) * (30 + steps) + t) * row; };
    for (cuda::GpuKvLayer* l : {&sync_layer, &async_layer})
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(l->add_sequence(), s);
        l->append(s, tok(k, s, 0), tok(v, s, 0), prompt[s]);
      }
    const std::vector<int> all = {0, 1, 2};
    cuda::DeviceBuffer bk(3 * row * 4), bv(3 * row * 4), nan_k(3 * row * 4);
    auto upload_step = [&](int step, cuda::DeviceBuffer& dk, cuda::DeviceBuffer& dv) {
      std::vector<float> kb(3 * row), vb(3 * row);
      for (int s = 0; s < 3; ++s) {
        std::copy(tok(k, s, prompt[s] + step), tok(k, s, prompt[s] + step) + row, kb.begin() + s * row);
        std::copy(tok(v, s, prompt[s] + step), tok(v, s, prompt[s] + step) + row, vb.begin() + s * row);
      }
      dk.upload(kb.data(), kb.size() * 4);
      dv.upload(vb.data(), vb.size() * 4);
    };
    const size_t nq = size_t(3) * hq * d;
    const auto q = test::random_gaussian(nq, 73);
    cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), ws(sync_layer.workspace_bytes(hq));
    dq.upload(q.data(), nq * 4);
    auto attend = [&](const cuda::GpuKvLayer& l) {
      std::vector<float> o(nq);
      l.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
      dout.download(o.data(), nq * 4);
      return o;
    };
    // Steps 0..19: synchronous on one layer, asynchronous (checked once) on the other.
    for (int step = 0; step < 20; ++step) {
      upload_step(step, bk, bv);
      sync_layer.append_batch_device(all.data(), 3, bk.as<float>(), bv.as<float>());
      async_layer.append_batch_device_async(all.data(), 3, bk.as<float>(), bv.as<float>());
    }
    async_layer.check_appends();
    auto same_layers = [&](const char* when) {
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(async_layer.n_tokens(s), sync_layer.n_tokens(s)) << when;
        const int n_pre = std::min(cfg.dense_prefix, sync_layer.n_tokens(s));
        const int n_comp = sync_layer.n_tokens(s) - n_pre - std::min(window, sync_layer.n_tokens(s) - n_pre);
        std::vector<uint8_t> ak(size_t(n_comp) * H * 66), av(ak.size()), sk(ak.size()), sv(ak.size());
        async_layer.read_records(s, n_pre, n_comp, ak.data(), av.data());
        sync_layer.read_records(s, n_pre, n_comp, sk.data(), sv.data());
        EXPECT_EQ(ak, sk) << when << ": K records of sequence " << s;
        EXPECT_EQ(av, sv) << when << ": V records of sequence " << s;
      }
      EXPECT_EQ(attend(async_layer), attend(sync_layer)) << when;
    };
    same_layers("after 20 asynchronous steps");
    // Step 20 with a NaN in sequence 1's key, then two clean steps: all dropped.
    const std::vector<float> before = attend(async_layer);
    upload_step(20, bk, bv);
    std::vector<float> kb(3 * row);
    bk.download(kb.data(), kb.size() * 4);
    kb[row + 9] = std::numeric_limits<float>::quiet_NaN();
    nan_k.upload(kb.data(), kb.size() * 4);
    async_layer.append_batch_device_async(all.data(), 3, nan_k.as<float>(), bv.as<float>());
    for (int step = 20; step < 22; ++step) {
      upload_step(step, bk, bv);
      async_layer.append_batch_device_async(all.data(), 3, bk.as<float>(), bv.as<float>());
    }
    EXPECT_EQ(async_layer.n_tokens(0), prompt[0] + 23) << "unchecked: counted as appended";
    {  // (the split plan follows the host's lengths, which count the dropped tokens: not bit for bit)
      const std::vector<float> after = attend(async_layer);
      EXPECT_LE(norm_err(after.data(), before.data(), nq), 1e-5) << "a refused asynchronous append changed the attention";
    }
    EXPECT_THROW(async_layer.check_appends(), Error);
    for (int s = 0; s < 3; ++s) EXPECT_EQ(async_layer.n_tokens(s), prompt[s] + 20);
    async_layer.check_appends();  // reported once
    // A host-side refusal throws at once and changes nothing.
    const std::vector<int> twice = {0, 0};
    EXPECT_THROW(async_layer.append_batch_device_async(twice.data(), 2, bk.as<float>(), bv.as<float>()), Error);
    // The same steps again (clean), the layer goes on and ends equal to the synchronous one.
    for (int step = 20; step < steps; ++step) {
      upload_step(step, bk, bv);
      sync_layer.append_batch_device(all.data(), 3, bk.as<float>(), bv.as<float>());
      async_layer.append_batch_device_async(all.data(), 3, bk.as<float>(), bv.as<float>());
      if (step == 30) {
        // A refusal met by a synchronous call: it throws the asynchronous
        // error, the layer as before the refused call.
        async_layer.append_batch_device_async(all.data(), 3, nan_k.as<float>(), bv.as<float>());
        EXPECT_THROW(async_layer.append_batch_device(all.data(), 3, bk.as<float>(), bv.as<float>()), Error);
        EXPECT_EQ(async_layer.n_tokens(2), sync_layer.n_tokens(2));
      }
    }
    async_layer.check_appends();
    same_layers("after the refusals and 20 more steps");
  }
}

TEST(CudaAppend, KernelOnlyRewriteIsIdempotent) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 8, d = 128, n = 300;
  auto kq = make_quantizer("tq-mse:b=4", d, 9), vq = make_quantizer("tq-mse:b=4", d, 10);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = H;
  cfg.max_pages_per_seq = 2;
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  layer.add_sequence();
  const TypedInput tk = typed_input(kv_data(size_t(n) * H, d, 1), cuda::DType::bf16);
  const TypedInput tv = typed_input(kv_data(size_t(n) * H, d, 2), cuda::DType::bf16);
  cuda::DeviceBuffer dk(tk.bytes.size()), dv(tv.bytes.size());
  dk.upload(tk.bytes.data(), tk.bytes.size());
  dv.upload(tv.bytes.data(), tv.bytes.size());
  layer.append_device(0, dk.data(), dv.data(), n, cuda::DType::bf16);
  const HostSeqPages before = download_pages(layer, 0);
  cuda::bench::AppendKernels kernels(layer, 0, n);
  EXPECT_GT(kernels.n_tiles(), 0);
  kernels.run(dk.data(), dv.data(), cuda::DType::bf16, nullptr);
  cuda::bench::synchronize(nullptr);
  EXPECT_EQ(download_pages(layer, 0), before);
  EXPECT_EQ(compare_records(layer, 0, *kq, *vq, tk.values.data(), tv.values.data(), 0, n, "kernels only"), 0);
}

// The read floor of tq gpu-bench: every variant takes sizes that are not a
// multiple of its unit (memcheck in scripts/gpu_suite.sh sees any read past
// the end), leaves its sink alone on ordinary data, and refuses bad arguments
// with the value named.
TEST(CudaBench, ReadFloorVariantsTakeAnySizeAndRefuseBadArguments) {
  TQ_SKIP_WITHOUT_GPU();
  const size_t cap = (size_t(1) << 20) + 48;
  cuda::DeviceBuffer buf(cap), sink(sizeof(unsigned));
  cuda::bench::fill_normal_bf16(buf.as<uint16_t>(), cap / 2, 3, 0.0f, 1.0f, nullptr);
  const unsigned marker = 0x5a5a5a5au;
  sink.upload(&marker, sizeof marker);
  int ran = 0;
  for (int v = 0; v < cuda::bench::kReadFloorVariants; ++v) {
    if (!cuda::bench::read_floor_supported(v)) continue;
    ++ran;
    for (size_t bytes : {size_t(16), size_t(8192 + 16), size_t(4096 * 16 + 32), cap})
      cuda::bench::read_floor(buf.data(), bytes, sink.as<unsigned>(), v, nullptr);
    cuda::bench::synchronize(nullptr);
  }
  EXPECT_GE(ran, 3);
  unsigned got = 0;
  sink.download(&got, sizeof got);
  EXPECT_EQ(got, marker);
  const std::string bad = test::error_message([&] {
    cuda::bench::read_floor(buf.data(), 32, sink.as<unsigned>(), cuda::bench::kReadFloorVariants, nullptr);
  });
  EXPECT_NE(bad.find("variant 4"), std::string::npos) << bad;
  const std::string odd = test::error_message(
      [&] { cuda::bench::read_floor(buf.data(), 24, sink.as<unsigned>(), 0, nullptr); });
  EXPECT_NE(odd.find("24 bytes"), std::string::npos) << odd;
  EXPECT_THROW(cuda::bench::read_floor(buf.as<uint8_t>() + 4, 32, sink.as<unsigned>(), 1, nullptr), Error);
}

// A sequence's pages, downloaded once (several attention cases read them).
struct HostSeq {
  int len = 0;
  std::vector<std::vector<uint8_t>> pages;
};

HostSeq download_seq(const cuda::GpuKvLayer& layer, int seq) {
  HostSeq hs;
  hs.len = layer.n_tokens(seq);
  hs.pages.resize(layer.n_pages(seq));
  for (size_t i = 0; i < hs.pages.size(); ++i) {
    hs.pages[i].resize(layer.page_bytes());
    layer.download_page(seq, int(i), hs.pages[i].data());
  }
  return hs;
}

// CPU attention over the GPU's own pages (downloaded), via attend_records.
// out: [Hq, d], lse: [Hq]
void cpu_attend_host(const cuda::GpuKvLayer& layer, const HostSeq& hs, const Quantizer& kq,
                     const Quantizer& vq, const float* q, int hq, const AttentionParams& p,
                     float* out, float* lse) {
  const int H = layer.config().n_heads_kv, P = layer.config().page_tokens, d = layer.head_dim();
  const int g = hq / H, len = hs.len;
  const size_t kb = kq.bytes_per_vector(), vb = vq.bytes_per_vector();
  std::vector<float> qp(size_t(g) * kq.query_floats());
  for (int h = 0; h < H; ++h) {
    OnlineSoftmax st(g, vq.acc_floats());
    kq.prepare_queries(q + size_t(h) * g * d, g, qp.data());
    for (int pg = 0; pg * P < len; ++pg) {
      const uint8_t* base = hs.pages[pg].data();
      const size_t n = std::min(P, len - pg * P);
      attend_records(kq, vq, qp.data(), g, base + size_t(h) * P * kb, kb,
                     base + size_t(P) * H * kb + size_t(h) * P * vb, vb, n, pg * P, len - 1, p, st);
    }
    st.finish(vq, out + size_t(h) * g * d, lse + size_t(h) * g);
  }
}

void cpu_attend_pages(const cuda::GpuKvLayer& layer, int seq, const Quantizer& kq,
                      const Quantizer& vq, const float* q, int hq, const AttentionParams& p,
                      float* out, float* lse) {
  cpu_attend_host(layer, download_seq(layer, seq), kq, vq, q, hq, p, out, lse);
}

// Every attend() in a scope runs this decode kernel (kernels.hpp override);
// split_tokens > 0 forces the tensor-core kernel's split (many items per block).
struct KernelScope {
  explicit KernelScope(cuda::DecodeKernel k, int split_tokens = 0) {
    cuda::set_decode_kernel_override(k);
    cuda::set_decode_tc_split_override(split_tokens);
  }
  ~KernelScope() {
    cuda::set_decode_kernel_override(cuda::DecodeKernel::automatic);
    cuda::set_decode_tc_split_override(0);
  }
  KernelScope(const KernelScope&) = delete;
  KernelScope& operator=(const KernelScope&) = delete;
};

cuda::DecodeShape decode_shape(int d, int kbits, int vbits, int g, int page_tokens,
                               bool k_f32 = false, bool v_f32 = false) {
  cuda::DecodeShape s;
  s.head_dim = d;
  s.k_bits = kbits;
  s.v_bits = vbits;
  s.k_scale_f32 = k_f32;
  s.v_scale_f32 = v_f32;
  s.group = g;
  s.page_tokens = page_tokens;
  s.kv_one_codebook = kbits == vbits;
  return s;
}

// attend() is capture-safe (cuda.hpp: never allocates, lengths and page
// tables live on the device, the grid covers max_pages_per_seq): a CUDA
// graph captured from one call replays to exactly what a direct call gives,
// also after the sequences grew past the pages they had at capture. The
// split is pinned (KernelScope) so that direct calls, which plan on the host
// from the current lengths, run the same kernels as the graph.
// The captured-attend tests' layer: tq-mse:b=4 K and V at head_dim 128, two
// KV heads, 16-token pages, two sequences (0 and 1) of up to 640 tokens.
struct GraphTestLayer {
  static constexpr int H = 2, d = 128;
  std::unique_ptr<Quantizer> kq = make_quantizer("tq-mse:b=4", d, 5), vq = make_quantizer("tq-mse:b=4", d, 6);
  cuda::GpuKvLayer layer{*kq, *vq, config()};
  GraphTestLayer() {
    layer.add_sequence();
    layer.add_sequence();
  }
  static cuda::GpuKvLayerConfig config() {
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = H;
    cfg.page_tokens = 16;
    cfg.max_seqs = 2;
    cfg.max_pages_per_seq = 40;
    return cfg;
  }
  // n more random tokens of sequence seq.
  void grow(int seq, int n, uint64_t seed) {
    const std::vector<float> k = kv_data(size_t(n) * H, d, seed), v = kv_data(size_t(n) * H, d, seed + 1);
    layer.append(seq, k.data(), v.data(), n);
  }
};

TEST(CudaGraph, CapturedAttendStaysExactAsSequencesGrow) {
  TQ_SKIP_WITHOUT_GPU();
  constexpr int g = 4, hq = GraphTestLayer::H * g, d = GraphTestLayer::d;
  for (const bool tc : {false, true}) {
    if (tc && cuda::decode_tc_unsupported(decode_shape(d, 4, 4, g, 16)) != nullptr) continue;
    SCOPED_TRACE(tc ? "tensor-core kernel" : "reference kernel");
    const KernelScope scope(tc ? cuda::DecodeKernel::tensor_core : cuda::DecodeKernel::reference, 512);
    GraphTestLayer t;
    const cuda::GpuKvLayer& layer = t.layer;
    t.grow(0, 100, 11);
    t.grow(1, 37, 13);
    const std::vector<float> q = test::random_gaussian(size_t(2) * hq * d, 17);
    cuda::DeviceBuffer dq(q.size() * 4), ws(layer.workspace_bytes(hq));
    dq.upload(q.data(), q.size() * 4);
    // Whole sequences, and a sliding window without sinks (the tensor-core
    // kernel's splits start at the window, found on the device at each replay).
    AttentionParams sliding;
    sliding.window = 70;
    const AttentionParams params[2] = {AttentionParams{}, sliding};
    std::vector<cuda::DeviceBuffer> direct, replayed;
    for (int i = 0; i < 2; ++i) {
      direct.emplace_back(q.size() * 4);
      replayed.emplace_back(q.size() * 4);
    }
    auto attend = [&](int i, cuda::DeviceBuffer& out, cuda::Stream stream) {
      layer.attend(dq.as<float>(), hq, params[i], out.as<float>(), nullptr, ws.data(), ws.size(), stream);
    };
    auto host = [&](const cuda::DeviceBuffer& b) {
      std::vector<float> h(q.size());
      b.download(h.data(), h.size() * 4);
      return h;
    };
    for (int i = 0; i < 2; ++i) attend(i, direct[i], nullptr);  // also warms the per-device caches
    cuda::bench::synchronize(nullptr);
    cuda::bench::CapturedGraph graph;
    graph.begin_capture();
    for (int i = 0; i < 2; ++i) attend(i, replayed[i], graph.stream());
    graph.end_capture();
    graph.replay();
    std::vector<std::vector<float>> before;
    for (int i = 0; i < 2; ++i) {
      before.push_back(host(direct[i]));
      EXPECT_EQ(host(replayed[i]), before[i]) << "params " << i;
    }

    t.grow(0, 300, 19);  // 100 -> 400 tokens: 19 more pages
    t.grow(1, 5, 23);
    for (int i = 0; i < 2; ++i) attend(i, direct[i], nullptr);
    cuda::bench::synchronize(nullptr);
    graph.replay();
    for (int i = 0; i < 2; ++i) {
      const std::vector<float> after = host(direct[i]);
      EXPECT_EQ(host(replayed[i]), after) << "params " << i;
      EXPECT_GT(test::norm_err(after.data(), before[i].data(), after.size()), 1e-3)  // the new tokens count
          << "params " << i;
    }
  }
}

// A captured attend with a bf16 query and an f16 output (the query's
// widening kernel and the tensor-core kernel as its programmatic dependent,
// both in the graph) replays to what a direct call gives, before and after
// the sequences grow.
TEST(CudaGraph, CapturedHalfPrecisionAttend) {
  TQ_SKIP_WITHOUT_GPU();
  constexpr int g = 4, hq = GraphTestLayer::H * g, d = GraphTestLayer::d;
  for (const bool tc : {false, true}) {
    if (tc && cuda::decode_tc_unsupported(decode_shape(d, 4, 4, g, 16)) != nullptr) continue;
    SCOPED_TRACE(tc ? "tensor-core kernel" : "reference kernel");
    const KernelScope scope(tc ? cuda::DecodeKernel::tensor_core : cuda::DecodeKernel::reference);
    GraphTestLayer t;
    const cuda::GpuKvLayer& layer = t.layer;
    t.grow(0, 100, 11);
    t.grow(1, 37, 13);
    const TypedInput q = typed_input(test::random_gaussian(size_t(2) * hq * d, 17), cuda::DType::bf16);
    cuda::DeviceBuffer dq(q.bytes.size()), ws(layer.workspace_bytes(hq)), direct(q.values.size() * 2),
        replayed(q.values.size() * 2);
    dq.upload(q.bytes.data(), q.bytes.size());
    auto attend = [&](cuda::DeviceBuffer& out, cuda::Stream stream) {
      layer.attend(dq.data(), cuda::DType::bf16, hq, {}, out.data(), cuda::DType::f16, nullptr, ws.data(), ws.size(),
                   stream);
    };
    auto host = [&](const cuda::DeviceBuffer& b) {
      std::vector<uint16_t> h(q.values.size());
      b.download(h.data(), h.size() * 2);
      return h;
    };
    attend(direct, nullptr);
    cuda::bench::synchronize(nullptr);
    cuda::bench::CapturedGraph graph;
    graph.begin_capture();
    attend(replayed, graph.stream());
    graph.end_capture();
    graph.replay();
    const std::vector<uint16_t> before = host(direct);
    EXPECT_EQ(host(replayed), before);
    t.grow(0, 300, 19);
    t.grow(1, 5, 23);
    attend(direct, nullptr);
    cuda::bench::synchronize(nullptr);
    graph.replay();
    const std::vector<uint16_t> after = host(direct);
    EXPECT_EQ(host(replayed), after);
    EXPECT_NE(after, before);  // the new tokens count
  }
}

// lse against the CPU: the reference kernel is fp32 throughout (1e-4); the
// tensor-core kernel's logits carry the fp16 rounding of the query and the
// centroids, ~2e-4 of |q||k|/sqrt(d) each (a few 1e-4 on the test data).
struct LseTol {
  double atol, rtol;
};
LseTol lse_tol(cuda::DecodeKernel k) {
  return k == cuda::DecodeKernel::tensor_core ? LseTol{2e-3, 1e-3} : LseTol{1e-4, 1e-4};
}

struct AttnCase {
  const char* name;
  AttentionParams params;
};

TEST(CudaAttention, MatchesCpuOverSameRecordsMixedLengthsGqaSplits) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, P = 16;
  // Mixed batch: empty, awkward lengths, page boundaries +-1.
  const std::vector<int> lens = {0, 1, 2, 15, 16, 17, 31, 33, 54, 97, 129, 257};
  const AttnCase cases[] = {{"plain", {}},
                            {"softcap+window+sinks", {0.0f, 30.0f, 40, 2}},
                            {"scale", {0.05f, 0.0f, 0, 0}}};
  double worst = 0;
  for (int d : {64, 128, 256})
    for (int g : {1, 4, 8})
      for (const auto& [kspec, vspec] : {std::pair{"tq-mse:b=4", "tq-mse:b=3"},
                                         std::pair{"tq-mse:b=2", "tq-mse:b=4,sf=f32"}}) {
        const int hq = H * g;
        const uint64_t seed = 77 + d * 3 + g;
        auto kq = make_quantizer(kspec, d, seed), vq = make_quantizer(vspec, d, seed + 1);
        cuda::GpuKvLayerConfig cfg;
        cfg.n_heads_kv = H;
        cfg.page_tokens = P;
        cfg.max_seqs = int(lens.size());
        cfg.max_pages_per_seq = 17;
        cfg.split_pages = 2;  // 257 tokens: 9 splits, the last one short
        cuda::GpuKvLayer layer(*kq, *vq, cfg);
        for (size_t s = 0; s < lens.size(); ++s) {
          layer.add_sequence();
          auto k = kv_data(size_t(lens[s]) * H, d, seed * 100 + s);
          auto v = kv_data(size_t(lens[s]) * H, d, seed * 100 + s + 50);
          layer.append(int(s), k.data(), v.data(), lens[s]);
        }
        const size_t nq = lens.size() * hq * d;
        const auto q = test::random_gaussian(nq, seed + 9);
        cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), dlse(lens.size() * hq * 4),
            ws(layer.workspace_bytes(hq));
        dq.upload(q.data(), nq * 4);
        std::vector<HostSeq> host;
        for (size_t s = 0; s < lens.size(); ++s) host.push_back(download_seq(layer, int(s)));
        // Both kernels: the reference, and what attend() picks by default
        // (tensor cores for the 4/3-bit pair, the reference for 2-bit K).
        for (const auto kernel : {cuda::DecodeKernel::reference, cuda::DecodeKernel::automatic})
          for (const auto& c : cases) {
            KernelScope scope(kernel);
            const int kbits = kspec[9] - '0', vbits = vspec[9] - '0';
            const bool v_f32 = std::string(vspec).find("sf=f32") != std::string::npos;
            const cuda::DecodeKernel used =
                cuda::decode_kernel_for(decode_shape(d, kbits, vbits, g, P, false, v_f32));
            const LseTol tol = lse_tol(used);
            const std::string what = std::string(kspec) + " / " + vspec + " d " + std::to_string(d) +
                                     " g " + std::to_string(g) + " " + c.name + " kernel " +
                                     cuda::to_string(used) + " seed " + std::to_string(seed);
            SCOPED_TRACE(what);
            // Poison the outputs: every element must be written.
            std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN()),
                lse(lens.size() * hq, std::numeric_limits<float>::quiet_NaN());
            dout.upload(out.data(), nq * 4);
            dlse.upload(lse.data(), lse.size() * 4);
            layer.attend(dq.as<float>(), hq, c.params, dout.as<float>(), dlse.as<float>(), ws.data(),
                         ws.size());
            dout.download(out.data(), nq * 4);
            dlse.download(lse.data(), lse.size() * 4);
            for (size_t s = 0; s < lens.size(); ++s) {
              std::vector<float> ro(size_t(hq) * d), rl(hq);
              cpu_attend_host(layer, host[s], *kq, *vq, q.data() + s * hq * d, hq, c.params,
                              ro.data(), rl.data());
              const float* go = out.data() + s * hq * d;
              if (lens[s] == 0) {
                for (int i = 0; i < hq * d; ++i) ASSERT_EQ(go[i], 0.0f) << "empty seq, elem " << i;
                for (int h = 0; h < hq; ++h) ASSERT_EQ(lse[s * hq + h], kEmptyLse);
                continue;
              }
              const double e = norm_err(go, ro.data(), size_t(hq) * d);
              worst = std::max(worst, e);
              EXPECT_LE(e, 1e-3) << "len " << lens[s];
              for (int h = 0; h < hq; ++h)
                EXPECT_TRUE(test::close(lse[s * hq + h], rl[h], tol.atol, tol.rtol))
                    << "lse, len " << lens[s] << " head " << h;
            }
          }
      }
  std::printf("worst normalised error vs CPU attend_records: %.3g\n", worst);
}

TEST(CudaAttention, MatchesKvCacheAttend) {
  TQ_SKIP_WITHOUT_GPU();
  for (int g : {1, 4, 8}) {
    SCOPED_TRACE("gqa " + std::to_string(g));
    KvCacheConfig cc;
    cc.n_layers = 1;
    cc.n_heads_kv = 2;
    cc.head_dim = 128;
    cc.k_format = parse_format("tq-mse:b=4");
    cc.v_format = parse_format("tq-mse:b=3");
    cc.page_tokens = 16;
    cc.seed = 11;
    KvCache cache(cc);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = cc.n_heads_kv;
    cfg.page_tokens = cc.page_tokens;
    cfg.max_seqs = 3;
    cfg.max_pages_per_seq = 8;
    cfg.split_pages = 3;
    cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    const int hq = cc.n_heads_kv * g, d = cc.head_dim;
    const std::vector<int> lens = {33, 97, 128};
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(cache.add_sequence(), s);
      layer.add_sequence();
      auto k = kv_data(size_t(lens[s]) * cc.n_heads_kv, d, 300 + s);
      auto v = kv_data(size_t(lens[s]) * cc.n_heads_kv, d, 400 + s);
      // KvCache::append encodes each token from its dense-format (f16) value;
      // the GPU layer encodes its fp32 input as given. f16-representable
      // inputs make both write the same bytes (on raw fp32 input the outputs
      // differ by ~0.5-3%: other records, not another kernel).
      for (auto* a : {&k, &v})
        for (float& x : *a) x = half_to_float(float_to_half(x));
      cache.append(s, 0, k.data(), v.data(), lens[s]);
      layer.append(s, k.data(), v.data(), lens[s]);
    }
    const size_t nq = size_t(3) * hq * d;
    const auto q = test::random_gaussian(nq, 5 + g);
    cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), ws(layer.workspace_bytes(hq));
    dq.upload(q.data(), nq * 4);
    std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN());
    dout.upload(out.data(), nq * 4);
    layer.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
    dout.download(out.data(), nq * 4);
    for (int s = 0; s < 3; ++s) {
      std::vector<float> ref(size_t(hq) * d);
      cache.attend(s, 0, q.data() + size_t(s) * hq * d, hq, {}, ref.data());
      EXPECT_LE(norm_err(out.data() + size_t(s) * hq * d, ref.data(), ref.size()), 1e-3)
          << "seq " << s << " len " << lens[s];
    }
  }
}

// Decode step `step` of every sequence s (token lens[s] + step of ks[s],
// vs[s], rows of `row` floats) into device buffers bk, bv [n_seqs, row].
void upload_decode_step(const std::vector<std::vector<float>>& ks, const std::vector<std::vector<float>>& vs,
                        const std::vector<int>& lens, int step, size_t row, cuda::DeviceBuffer& bk,
                        cuda::DeviceBuffer& bv) {
  const size_t n = lens.size();
  std::vector<float> kb(n * row), vb(n * row);
  for (size_t s = 0; s < n; ++s) {
    const size_t at = size_t(lens[s] + step) * row;
    std::copy(ks[s].begin() + at, ks[s].begin() + at + row, kb.begin() + s * row);
    std::copy(vs[s].begin() + at, vs[s].begin() + at + row, vb.begin() + s * row);
  }
  bk.upload(kb.data(), kb.size() * 4);
  bv.upload(vb.data(), vb.size() * 4);
}

// The compressed tokens [n_pre, n_pre + n_comp) of sequence s: every layer
// holds the cache's records, bit for bit (the second layer is the one
// filled by device appends).
void expect_cache_records(const KvCache& cache, int s, int n_pre, int n_comp,
                          std::initializer_list<const cuda::GpuKvLayer*> layers) {
  if (n_comp <= 0) return;
  const int H = cache.config().n_heads_kv;
  const size_t kb = cache.k_quantizer(0).bytes_per_vector(), vb = cache.v_quantizer(0).bytes_per_vector();
  std::vector<uint8_t> ck(size_t(n_comp) * H * kb), cv(size_t(n_comp) * H * vb), gk(ck.size()), gv(cv.size());
  cache.read_records(s, 0, n_pre, n_comp, ck.data(), cv.data());
  int i = 0;
  for (const cuda::GpuKvLayer* l : layers) {
    ASSERT_EQ(l->k_record_bytes(), kb);
    l->read_records(s, n_pre, n_comp, gk.data(), gv.data());
    EXPECT_EQ(ck, gk) << "K records of sequence " << s << (i == 1 ? " (device appends)" : "");
    EXPECT_EQ(cv, gv) << "V records of sequence " << s << (i == 1 ? " (device appends)" : "");
    ++i;
  }
}

// attend() of every layer for queries q [n_seqs, hq, d] under each of
// params: within 1e-3 (normalised) of KvCache::attend, lse within 5e-3 (plus
// the tensor-core kernel's relative tolerance where it runs: its fp16
// queries move a logit of ~80, as the awkward keys give, by ~0.02).
// Returns the worst error.
double expect_cache_attention(const KvCache& cache, int n_seqs, int hq, const std::vector<float>& q,
                              std::initializer_list<const cuda::GpuKvLayer*> layers,
                              const std::vector<AttentionParams>& params) {
  const int d = cache.config().head_dim;
  const size_t nq = size_t(n_seqs) * hq * d;
  cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), dlse(size_t(n_seqs) * hq * 4),
      ws((*layers.begin())->workspace_bytes(hq));
  dq.upload(q.data(), nq * 4);
  double worst = 0;
  for (const cuda::GpuKvLayer* l : layers)
    for (const AttentionParams& ap : params) {
      const double lse_rtol =
          l->attend_kernel(hq) == "tensor_core" ? lse_tol(cuda::DecodeKernel::tensor_core).rtol : 0.0;
      std::vector<float> out(nq, std::numeric_limits<float>::quiet_NaN()), lse(size_t(n_seqs) * hq);
      dout.upload(out.data(), nq * 4);
      l->attend(dq.as<float>(), hq, ap, dout.as<float>(), dlse.as<float>(), ws.data(), ws.size());
      dout.download(out.data(), nq * 4);
      dlse.download(lse.data(), lse.size() * 4);
      for (int s = 0; s < n_seqs; ++s) {
        std::vector<float> ref(size_t(hq) * d), ref_lse(hq);
        cache.attend(s, 0, q.data() + size_t(s) * hq * d, hq, ap, ref.data(), ref_lse.data());
        const double e = norm_err(out.data() + size_t(s) * hq * d, ref.data(), ref.size());
        worst = std::max(worst, e);
        EXPECT_LE(e, 1e-3) << "seq " << s << " window " << ap.window << " softcap " << ap.softcap;
        for (int h = 0; h < hq; ++h)
          EXPECT_NEAR(lse[size_t(s) * hq + h], ref_lse[h], 5e-3 + lse_rtol * std::fabs(ref_lse[h]))
              << "seq " << s << " head " << h;
      }
    }
  return worst;
}

// Plain attention, a sliding window of `window` with `sinks` sinks and
// without (the tensor-core kernel's splits then start at the window), and a
// logit softcap of 5 (with an explicit scale where scale > 0).
std::vector<AttentionParams> plain_sliding_capped(int window, int sinks, float scale) {
  AttentionParams sliding;
  sliding.window = window;
  sliding.n_sinks = sinks;
  AttentionParams no_sinks;
  no_sinks.window = window;
  AttentionParams capped;
  capped.softcap = 5.0f;
  capped.scale = scale;
  return {AttentionParams{}, sliding, no_sinks, capped};
}

// Sequence s of every layer holds totals[s] tokens, the first `prefix` and
// the newest `window` dense, and the rest are the cache's records.
void expect_cache_layers(const KvCache& cache, const std::vector<int>& totals, int prefix, int window,
                         std::initializer_list<const cuda::GpuKvLayer*> layers) {
  for (size_t s = 0; s < totals.size(); ++s) {
    const int t = totals[s];
    for (const cuda::GpuKvLayer* l : layers) ASSERT_EQ(l->n_tokens(int(s)), t);
    const int n_pre = std::min(prefix, t), n_comp = std::max(0, t - prefix - window);
    expect_cache_records(cache, int(s), n_pre, n_comp, layers);
  }
}

// A GPU layer configuration mirroring a KvCache's (heads, pages, dense
// window and prefix), for max_seqs sequences of up to 12 pages, 2 pages per split.
cuda::GpuKvLayerConfig layer_config_like(const KvCacheConfig& cc, int max_seqs) {
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = cc.n_heads_kv;
  cfg.page_tokens = cc.page_tokens;
  cfg.max_seqs = max_seqs;
  cfg.max_pages_per_seq = 12;
  cfg.split_pages = 2;
  cfg.dense_window = cc.dense_window;
  cfg.dense_prefix = cc.dense_prefix;
  return cfg;
}

// A dense window and prefix (GpuKvLayerConfig::dense_window / dense_prefix)
// behave as KvCache's: the same records in the pages (bit for bit) for
// tokens appended in pieces that wrap the ring, from host memory (append)
// and from device memory (append_device for the prompt, append_batch_device
// for decode steps of every sequence at once), and the same attention within
// 1e-3, sliding window, sinks and softcap included, on both decode kernels;
// sequences still inside the prefix or the window have no pages.
TEST(CudaWindow, DenseWindowAndPrefixMatchKvCache) {
  TQ_SKIP_WITHOUT_GPU();
  struct Case {
    int window, prefix, d, group;
  };
  double worst = 0;
  // The last two put the dense part over two token splits (64 tokens per
  // block at d 128, 32 at d 256) and, at group 16 and d 256, two blocks of
  // query heads.
  for (const Case c : {Case{16, 4, 128, 4}, Case{0, 3, 128, 4}, Case{8, 0, 256, 4}, Case{5, 2, 64, 4},
                       Case{40, 3, 256, 16}, Case{70, 4, 128, 8}})
    for (const auto kernel : {cuda::DecodeKernel::automatic, cuda::DecodeKernel::reference}) {
      SCOPED_TRACE("window " + std::to_string(c.window) + " prefix " + std::to_string(c.prefix) + " d " +
                   std::to_string(c.d) + " group " + std::to_string(c.group) + " kernel " +
                   cuda::to_string(kernel));
      cuda::set_decode_kernel_override(kernel);
      KvCacheConfig cc;
      cc.n_layers = 1;
      cc.n_heads_kv = 2;
      cc.head_dim = c.d;
      cc.k_format = parse_format("tq-mse:b=4");
      cc.v_format = parse_format("tq-mse:b=3");
      cc.page_tokens = 16;
      cc.dense_window = c.window;
      cc.dense_prefix = c.prefix;
      cc.seed = 21;
      KvCache cache(cc);
      const cuda::GpuKvLayerConfig cfg = layer_config_like(cc, 4);
      cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
      cuda::GpuKvLayer dlayer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);  // device appends
      const int H = cc.n_heads_kv, d = c.d, g = c.group, hq = H * g;
      const size_t row = size_t(H) * d;
      const std::vector<int> lens = {2, 11, 45, 150};
      std::vector<std::vector<float>> ks, vs;
      for (int s = 0; s < 4; ++s) {
        ASSERT_EQ(cache.add_sequence(), s);
        ASSERT_EQ(layer.add_sequence(), s);
        ASSERT_EQ(dlayer.add_sequence(), s);
        ks.push_back(kv_data(size_t(lens[s] + 5) * H, d, 700 + s));
        vs.push_back(kv_data(size_t(lens[s] + 5) * H, d, 800 + s));
        const auto& k = ks.back();
        const auto& v = vs.back();
        // In pieces of 7, then the rest (decode tokens follow below): the ring wraps.
        int t = 0;
        for (int piece : {std::min(7, lens[s]), lens[s] - std::min(7, lens[s])}) {
          cache.append(s, 0, k.data() + t * row, v.data() + t * row, piece);
          layer.append(s, k.data() + t * row, v.data() + t * row, piece);
          if (piece > 0) {
            cuda::DeviceBuffer dk(piece * row * 4), dv(piece * row * 4);
            dk.upload(k.data() + t * row, piece * row * 4);
            dv.upload(v.data() + t * row, piece * row * 4);
            dlayer.append_device(s, dk.as<float>(), dv.as<float>(), piece);
          }
          t += piece;
        }
      }
      // 5 decode steps, each one token for every sequence (batched on the device layer).
      const std::vector<int> all = {0, 1, 2, 3};
      cuda::DeviceBuffer bk(4 * row * 4), bv(4 * row * 4);
      for (int step = 0; step < 5; ++step) {
        for (int s = 0; s < 4; ++s) {
          const size_t at = size_t(lens[s] + step) * row;
          cache.append(s, 0, ks[s].data() + at, vs[s].data() + at, 1);
          layer.append(s, ks[s].data() + at, vs[s].data() + at, 1);
        }
        upload_decode_step(ks, vs, lens, step, row, bk, bv);
        dlayer.append_batch_device(all.data(), 4, bk.as<float>(), bv.as<float>());
      }
      std::vector<int> totals;
      for (int s = 0; s < 4; ++s) {
        totals.push_back(lens[s] + 5);
        ASSERT_EQ(cache.n_tokens(s, 0), totals.back());
      }
      expect_cache_layers(cache, totals, c.prefix, c.window, {&layer, &dlayer});
      worst = std::max(worst, expect_cache_attention(cache, 4, hq, test::random_gaussian(size_t(4) * hq * d, 31),
                                                     {&layer, &dlayer}, plain_sliding_capped(40, 3, 0.2f)));
    }
  cuda::set_decode_kernel_override(cuda::DecodeKernel::automatic);
  std::printf("dense window and prefix: worst normalised error vs KvCache %.3g\n", worst);

  // Refusals leave the sequence unchanged; records cannot enter a layer whose
  // first and newest tokens are dense.
  KvCacheConfig cc = KvCacheConfig::from_preset("turbo4", 1, 1, 128);
  KvCache cache(cc);
  cuda::GpuKvLayerConfig cfg;
  cfg.dense_window = 4;
  cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
  layer.add_sequence();
  std::vector<float> ok_rows(3 * 128, 0.5f), nan_row(128, 1.0f), big_row(128, 1.0f);
  nan_row[7] = std::numeric_limits<float>::quiet_NaN();
  big_row[9] = 70000.0f;
  layer.append(0, ok_rows.data(), ok_rows.data(), 3);
  for (const auto* bad : {&nan_row, &big_row}) {
    EXPECT_THROW(layer.append(0, bad->data(), bad->data(), 1), Error);
    cuda::DeviceBuffer buf(128 * 4);
    buf.upload(bad->data(), 128 * 4);
    EXPECT_THROW(layer.append_device(0, buf.as<float>(), buf.as<float>(), 1), Error);
    const int seq0 = 0;
    EXPECT_THROW(layer.append_batch_device(&seq0, 1, buf.as<float>(), buf.as<float>()), Error);
    EXPECT_EQ(layer.n_tokens(0), 3);
  }
  std::vector<uint8_t> rec(layer.k_record_bytes());
  EXPECT_THROW(layer.append_records(0, rec.data(), rec.data(), 1), Error);
  cfg.round_to = cuda::DType::bf16;
  EXPECT_THROW(cuda::GpuKvLayer(cache.k_quantizer(0), cache.v_quantizer(0), cfg), Error);

  // A batched decode append that fails late (sequence 0's aged ring token
  // needs a second page, and it may hold one) changes no sequence: not the
  // ring, the states, the pages or the lengths.
  cuda::GpuKvLayerConfig small;
  small.n_heads_kv = 1;
  small.page_tokens = 16;
  small.max_seqs = 2;
  small.max_pages_per_seq = 1;
  small.dense_window = 4;
  small.dense_prefix = 1;
  cuda::GpuKvLayer tight(cache.k_quantizer(0), cache.v_quantizer(0), small);
  const auto kk = kv_data(21, 128, 41), vv = kv_data(21, 128, 42);
  ASSERT_EQ(tight.add_sequence(), 0);
  ASSERT_EQ(tight.add_sequence(), 1);
  tight.append(0, kk.data(), vv.data(), 21);  // prefix 1, one full page, ring 4
  tight.append(1, kk.data(), vv.data(), 5);   // prefix 1, ring 4
  const int both[2] = {0, 1};
  cuda::DeviceBuffer nk(2 * 128 * 4), nv(2 * 128 * 4), tqr(2 * 4 * 128 * 4), tout(2 * 4 * 128 * 4),
      tws(tight.workspace_bytes(4));
  const auto q4 = test::random_gaussian(2 * 4 * 128, 43);
  nk.upload(kk.data(), 2 * 128 * 4);
  nv.upload(vv.data(), 2 * 128 * 4);
  tqr.upload(q4.data(), q4.size() * 4);
  auto attend_now = [&] {
    std::vector<float> o(q4.size());
    tight.attend(tqr.as<float>(), 4, AttentionParams{}, tout.as<float>(), nullptr, tws.data(), tws.size());
    tout.download(o.data(), o.size() * 4);
    return o;
  };
  const std::vector<float> before = attend_now();
  std::vector<uint8_t> rk(16 * tight.k_record_bytes()), rv(16 * tight.v_record_bytes());
  tight.read_records(0, 1, 16, rk.data(), rv.data());
  EXPECT_THROW(tight.append_batch_device(both, 2, nk.as<float>(), nv.as<float>()), Error);
  EXPECT_EQ(tight.n_tokens(0), 21);
  EXPECT_EQ(tight.n_tokens(1), 5);
  EXPECT_EQ(attend_now(), before) << "a refused batched append changed the dense tokens or the pages";
  std::vector<uint8_t> rk2(rk.size()), rv2(rv.size());
  tight.read_records(0, 1, 16, rk2.data(), rv2.data());
  EXPECT_EQ(rk, rk2);
  EXPECT_EQ(rv, rv2);
  // A NaN in the new token of a sequence whose aged token goes to the pages
  // in the same call: the aged token's append succeeds on the device, and
  // the rounding's flag still keeps everything uncommitted.
  std::vector<float> nan_pair(2 * 128, 0.25f);
  nan_pair[5] = std::numeric_limits<float>::quiet_NaN();  // row 0: sequence 1 (one_then_zero)
  cuda::DeviceBuffer bad(2 * 128 * 4);
  bad.upload(nan_pair.data(), nan_pair.size() * 4);
  const int one_then_zero[2] = {1, 0};
  small.max_pages_per_seq = 2;  // room for sequence 0 too, so only the NaN refuses
  cuda::GpuKvLayer roomy(cache.k_quantizer(0), cache.v_quantizer(0), small);
  ASSERT_EQ(roomy.add_sequence(), 0);
  ASSERT_EQ(roomy.add_sequence(), 1);
  roomy.append(0, kk.data(), vv.data(), 21);
  roomy.append(1, kk.data(), vv.data(), 5);
  EXPECT_THROW(roomy.append_batch_device(one_then_zero, 2, bad.as<float>(), bad.as<float>()), Error);
  EXPECT_EQ(roomy.n_tokens(0), 21);
  EXPECT_EQ(roomy.n_tokens(1), 5);
  roomy.append_batch_device(both, 2, nk.as<float>(), nv.as<float>());  // and a clean step still works
  EXPECT_EQ(roomy.n_tokens(0), 22);
  EXPECT_EQ(roomy.n_tokens(1), 6);
  std::vector<uint8_t> r1k(tight.k_record_bytes()), r1v(tight.v_record_bytes());
  roomy.read_records(1, 1, 1, r1k.data(), r1v.data());  // sequence 1's first compressed token
  // Sequence 1 alone still fits: its aged token takes its first page.
  tight.append_batch_device(&both[1], 1, nk.as<float>(), nv.as<float>());
  EXPECT_EQ(tight.n_tokens(1), 6);
  std::vector<uint8_t> t1k(r1k.size()), t1v(r1v.size());
  tight.read_records(1, 1, 1, t1k.data(), t1v.data());
  EXPECT_EQ(r1k, t1k) << "the same aged token, appended after a refused call, differs";
  EXPECT_EQ(r1v, t1v);
}

// A cache saved on the CPU loads on the GPU and back: KvCache -> file ->
// KvCache::load -> read_records -> GpuKvLayer::append_records gives the same
// page bytes and attention within 1e-3; GPU-appended records go the other
// way into a KvCache (saved and loaded again) with the same attention.
TEST(CudaRecords, SavedCacheMovesToTheGpuAndBack) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, d = 128, g = 4, hq = H * g, n = 300;
  KvCacheConfig cc = KvCacheConfig::from_preset("turbo4", 1, H, d);
  cc.page_tokens = 16;
  cc.seed = 21;
  const std::string path = testing::TempDir() + "tq_cuda_records.tqkv";
  {
    KvCache src(cc);
    const int s = src.add_sequence();
    const auto k = kv_data(size_t(n) * H, d, 501), v = kv_data(size_t(n) * H, d, 502);
    src.append(s, 0, k.data(), v.data(), n);
    src.save(path);
  }
  KvCache cpu(cc);
  cpu.load(path);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = H;
  cfg.page_tokens = 256;  // another page size than the CPU's: records, not pages, travel
  cfg.max_seqs = 2;
  cfg.max_pages_per_seq = 4;
  cuda::GpuKvLayer gpu(cpu.k_quantizer(0), cpu.v_quantizer(0), cfg);
  const size_t kb = gpu.k_record_bytes(), vb = gpu.v_record_bytes();
  ASSERT_EQ(kb, cpu.k_quantizer(0).bytes_per_vector());
  std::vector<uint8_t> kr(size_t(n) * H * kb), vr(size_t(n) * H * vb);
  cpu.read_records(0, 0, 0, n, kr.data(), vr.data());
  ASSERT_EQ(gpu.add_sequence(), 0);
  gpu.append_records(0, kr.data(), vr.data(), 100);
  gpu.append_records(0, kr.data() + size_t(100) * H * kb, vr.data() + size_t(100) * H * vb, n - 100);
  ASSERT_EQ(gpu.n_tokens(0), n);
  std::vector<uint8_t> kg(kr.size()), vg(vr.size());
  gpu.read_records(0, 0, n, kg.data(), vg.data());
  EXPECT_EQ(kg, kr);
  EXPECT_EQ(vg, vr);

  // GPU-encoded records the other way: a second GPU sequence, appended from
  // f16-representable input, into a fresh KvCache, saved, loaded.
  ASSERT_EQ(gpu.add_sequence(), 1);
  auto k2 = kv_data(size_t(n) * H, d, 503), v2 = kv_data(size_t(n) * H, d, 504);
  gpu.append(1, k2.data(), v2.data(), n);
  std::vector<uint8_t> k2r(kr.size()), v2r(vr.size());
  gpu.read_records(1, 0, n, k2r.data(), v2r.data());
  {
    KvCache back(cc);
    ASSERT_EQ(back.add_sequence(), 0);
    ASSERT_EQ(back.add_sequence(), 1);
    back.append_records(0, 0, kr.data(), vr.data(), n);
    back.append_records(1, 0, k2r.data(), v2r.data(), n);
    back.save(path);
  }
  KvCache back(cc);
  back.load(path);
  std::remove(path.c_str());

  const size_t nq = size_t(2) * hq * d;
  const auto q = test::random_gaussian(nq, 505);
  cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), ws(gpu.workspace_bytes(hq));
  dq.upload(q.data(), nq * 4);
  gpu.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
  std::vector<float> out(nq);
  dout.download(out.data(), nq * 4);
  for (int s = 0; s < 2; ++s) {
    std::vector<float> ref(size_t(hq) * d), ref_loaded(ref.size());
    back.attend(s, 0, q.data() + size_t(s) * hq * d, hq, {}, ref.data());
    EXPECT_LE(norm_err(out.data() + size_t(s) * hq * d, ref.data(), ref.size()), 1e-3) << "seq " << s;
    if (s == 0) {  // the CPU cache it came from
      cpu.attend(0, 0, q.data(), hq, {}, ref_loaded.data());
      EXPECT_EQ(std::memcmp(ref.data(), ref_loaded.data(), ref.size() * 4), 0);
    }
  }
  // A record with a NaN scale is refused; the sequence keeps its tokens.
  std::vector<uint8_t> bad(kr.begin(), kr.begin() + H * kb), badv(vr.begin(), vr.begin() + H * vb);
  const uint16_t nan_half = 0x7e00;
  std::memcpy(&bad[kb - 2], &nan_half, 2);
  EXPECT_THROW(gpu.append_records(0, bad.data(), badv.data(), 1), Error);
  EXPECT_EQ(gpu.n_tokens(0), n);
  EXPECT_THROW(gpu.read_records(0, n - 1, 2, kg.data(), vg.data()), Error);
}

// ---- The tensor-core decode kernel (decode_attention_tc.cu) -------------------

// Runs attend() with one kernel; outputs poisoned with NaN first.
struct AttnOut {
  std::vector<float> out, lse;
};
AttnOut run_attend(const cuda::GpuKvLayer& layer, const cuda::DeviceBuffer& dq, int hq,
                   const AttentionParams& prm, cuda::DecodeKernel k, int split_tokens = 0,
                   bool tensor_copies = true) {
  KernelScope scope(k, split_tokens);
  cuda::set_decode_tc_tensor_copies(tensor_copies);
  struct Restore {
    ~Restore() { cuda::set_decode_tc_tensor_copies(true); }
  } restore;
  const size_t n = size_t(layer.n_seqs()) * hq * layer.head_dim(), nl = size_t(layer.n_seqs()) * hq;
  AttnOut r{std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()),
            std::vector<float>(nl, std::numeric_limits<float>::quiet_NaN())};
  cuda::DeviceBuffer dout(n * 4), dlse(nl * 4), ws(layer.workspace_bytes(hq));
  dout.upload(r.out.data(), n * 4);
  dlse.upload(r.lse.data(), nl * 4);
  layer.attend(dq.as<float>(), hq, prm, dout.as<float>(), dlse.as<float>(), ws.data(), ws.size());
  dout.download(r.out.data(), n * 4);
  dlse.download(r.lse.data(), nl * 4);
  return r;
}

// The tensor-core kernel's two ways of copying tile pairs on sm_90 (one or
// two tensor copies a pair where the pool is described, else bulk copies)
// land the same bytes in the same places: outputs must be bit-identical.
void expect_same_bits(const AttnOut& a, const AttnOut& b) {
  ASSERT_EQ(a.out.size(), b.out.size());
  ASSERT_EQ(a.lse.size(), b.lse.size());
  EXPECT_EQ(std::memcmp(a.out.data(), b.out.data(), a.out.size() * 4), 0) << "outputs differ";
  EXPECT_EQ(std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4), 0) << "lse differ";
}

// Worst errors of a comparison run.
struct Worst {
  double cpu = 0, ref = 0, lse = 0;
  void print(const char* what) const {
    std::printf("%s: worst normalised error vs CPU %.3g, vs reference kernel %.3g; worst |lse "
                "diff| %.3g\n", what, cpu, ref, lse);
  }
};

// CPU attention (attend_records) of every sequence over the downloaded pages.
AttnOut cpu_attend_all(const cuda::GpuKvLayer& layer, const std::vector<HostSeq>& host,
                       const Quantizer& kq, const Quantizer& vq, const std::vector<float>& q,
                       int hq, const AttentionParams& prm) {
  const size_t d = layer.head_dim();
  AttnOut r{std::vector<float>(host.size() * hq * d), std::vector<float>(host.size() * hq)};
  for (size_t s = 0; s < host.size(); ++s)
    if (host[s].len > 0)
      cpu_attend_host(layer, host[s], kq, vq, q.data() + s * hq * d, hq, prm,
                      r.out.data() + s * hq * d, r.lse.data() + s * hq);
  return r;
}

// The tensor-core outputs of every sequence against the CPU over the same
// records (1e-3) and against the reference kernel (1e-3); lse within LseTol.
void check_tc(const std::vector<HostSeq>& host, int hq, int d, const AttnOut& tc,
              const AttnOut& cpu, const AttnOut& ref, Worst& worst) {
  const LseTol tol = lse_tol(cuda::DecodeKernel::tensor_core);
  for (size_t s = 0; s < host.size(); ++s) {
    const float* go = tc.out.data() + s * hq * d;
    const float* gl = tc.lse.data() + s * hq;
    if (host[s].len == 0) {
      for (int i = 0; i < hq * d; ++i) ASSERT_EQ(go[i], 0.0f) << "empty seq " << s << ", elem " << i;
      for (int h = 0; h < hq; ++h) ASSERT_EQ(gl[h], kEmptyLse) << "empty seq " << s;
      continue;
    }
    const float* ro = cpu.out.data() + s * hq * d;
    const float* rl = cpu.lse.data() + s * hq;
    const double e_cpu = norm_err(go, ro, size_t(hq) * d);
    const double e_ref = norm_err(go, ref.out.data() + s * hq * d, size_t(hq) * d);
    worst.cpu = std::max(worst.cpu, e_cpu);
    worst.ref = std::max(worst.ref, e_ref);
    EXPECT_LE(e_cpu, 1e-3) << "seq " << s << " len " << host[s].len << " vs CPU";
    EXPECT_LE(e_ref, 1e-3) << "seq " << s << " len " << host[s].len << " vs reference kernel";
    for (int h = 0; h < hq; ++h) {
      worst.lse = std::max(worst.lse, double(std::fabs(gl[h] - rl[h])));
      EXPECT_TRUE(test::close(gl[h], rl[h], tol.atol, tol.rtol))
          << "lse, seq " << s << " len " << host[s].len << " head " << h;
    }
  }
}

// A layer of H KV heads and P-token pages for n_seqs sequences of up to
// max_len tokens, 4 pages a reference-kernel split.
cuda::GpuKvLayerConfig tc_test_config(int H, int P, int n_seqs, int max_len) {
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = H;
  cfg.page_tokens = P;
  cfg.max_seqs = n_seqs;
  cfg.max_pages_per_seq = (max_len + P - 1) / P;
  cfg.split_pages = 4;
  return cfg;
}

TEST(CudaAttentionTc, KernelSelection) {
  TQ_SKIP_WITHOUT_GPU();
  const cuda::DecodeShape llama4 = decode_shape(128, 4, 4, 4, 256);
  if (const char* why = cuda::decode_tc_unsupported(llama4))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  // The targets (and the awkward shapes of the tests) get the tensor-core kernel.
  for (const auto& s : {llama4, decode_shape(128, 3, 3, 4, 256), decode_shape(128, 3, 4, 4, 256),
                        decode_shape(256, 4, 4, 4, 256), decode_shape(256, 3, 4, 4, 256),
                        decode_shape(64, 4, 3, 1, 16), decode_shape(128, 4, 4, 8, 16)}) {
    EXPECT_EQ(cuda::decode_tc_unsupported(s), nullptr)
        << "d " << s.head_dim << " bits " << s.k_bits << "/" << s.v_bits << " g " << s.group;
    EXPECT_EQ(cuda::decode_kernel_for(s), cuda::DecodeKernel::tensor_core);
  }
  // Everything else falls back to the reference, with a reason.
  for (const auto& s : {decode_shape(128, 2, 4, 4, 256), decode_shape(128, 4, 5, 4, 256),
                        decode_shape(128, 4, 4, 4, 256, false, true), decode_shape(128, 4, 4, 16, 256),
                        decode_shape(128, 4, 4, 4, 8), decode_shape(96, 4, 4, 4, 256)}) {
    const char* why = cuda::decode_tc_unsupported(s);
    ASSERT_NE(why, nullptr);
    std::printf("reference for d %d bits %d/%d g %d pages %d: %s\n", s.head_dim, s.k_bits,
                s.v_bits, s.group, s.page_tokens, why);
    EXPECT_EQ(cuda::decode_kernel_for(s), cuda::DecodeKernel::reference);
  }
  {
    KernelScope scope(cuda::DecodeKernel::reference);
    EXPECT_EQ(cuda::decode_kernel_for(llama4), cuda::DecodeKernel::reference);
  }
  {
    KernelScope scope(cuda::DecodeKernel::tensor_core);
    EXPECT_EQ(cuda::decode_kernel_for(llama4), cuda::DecodeKernel::tensor_core);
    EXPECT_THROW((void)cuda::decode_kernel_for(decode_shape(128, 2, 4, 4, 256)), Error);
  }
}

// 3-bit K and V codes decode through byte tables that hold one codebook for
// both: K and V of equal codebooks (the layer says so from its host
// formats) run on the tensor-core kernel; 3-bit K and V codebooks of
// different laws (plain, and the 3-bit halves of turbo2.5) fall back to the
// reference kernel with the reason, and asking for the tensor-core kernel
// there throws; a 4-bit side (turbo3.5's hi half) has its own tables.
TEST(CudaAttentionTc, ThreeBitCodebooksOfKAndV) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 3, 3, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  cuda::DecodeShape two = decode_shape(128, 3, 3, 4, 16);
  two.kv_one_codebook = false;
  ASSERT_NE(cuda::decode_tc_unsupported(two), nullptr);
  EXPECT_NE(std::string(cuda::decode_tc_unsupported(two)).find("different codebooks"), std::string::npos);
  two.k_bits = 4;
  EXPECT_EQ(cuda::decode_tc_unsupported(two), nullptr);

  struct Case {
    const char *k, *v;
    bool tc, split;
  };
  const int H = 2, g = 4, hq = H * g, d = 128;
  for (const Case& c : {Case{"tq-mse:b=3", "tq-mse:b=3", true, false},
                        Case{"tq-mse:b=3,cb=gauss", "tq-mse:b=3", false, false},
                        Case{"tq-mse:b=2.5", "tq-mse:b=2.5", true, true},
                        Case{"tq-mse:b=2.5,cb=gauss", "tq-mse:b=2.5", false, true},
                        Case{"tq-mse:b=3.5,cb=gauss", "tq-mse:b=3.5", true, true}}) {
    SCOPED_TRACE(std::string(c.k) + " / " + c.v);
    auto kq = make_quantizer(c.k, d, 71), vq = make_quantizer(c.v, d, 72);
    cuda::GpuKvLayer layer(*kq, *vq, tc_test_config(H, 16, 1, 300));
    const std::string kernel = layer.attend_kernel(hq);
    if (c.tc) {
      EXPECT_EQ(kernel, "tensor_core");
    } else {
      EXPECT_EQ(kernel.rfind("reference: 3-bit K and V with different codebooks", 0), 0u) << kernel;
    }
    layer.add_sequence();
    const auto k = kv_data(size_t(300) * H, d, 73), v = kv_data(size_t(300) * H, d, 74);
    layer.append(0, k.data(), v.data(), 300);
    const auto q = test::random_gaussian(size_t(hq) * d, 75);
    cuda::DeviceBuffer dq(q.size() * 4);
    dq.upload(q.data(), q.size() * 4);
    const std::vector<HostSeq> host = {download_seq(layer, 0)};
    const AttnOut ref = run_attend(layer, dq, hq, {}, cuda::DecodeKernel::reference);
    // Splits: the layer chose its hi channels, which the CPU quantizer does
    // not know; the reference kernel stands in for the CPU (as above).
    const AttnOut cpu = c.split ? ref : cpu_attend_all(layer, host, *kq, *vq, q, hq, {});
    if (c.tc) {
      Worst worst;
      check_tc(host, hq, d, run_attend(layer, dq, hq, {}, cuda::DecodeKernel::tensor_core), cpu, ref, worst);
    } else {
      expect_same_bits(ref, run_attend(layer, dq, hq, {}, cuda::DecodeKernel::automatic));
      EXPECT_THROW((void)run_attend(layer, dq, hq, {}, cuda::DecodeKernel::tensor_core), Error);
    }
  }
}

// Every supported width pair, head_dim and GQA group; a mixed batch with odd
// lengths, page boundaries +-1 (16- and 48-token pages: tile pairs inside a
// page and across two), an empty and a long
// sequence; softcap + window + sinks, an explicit scale, a window that skips
// whole tiles. The tensor-core kernel with its planned splits and with the
// smallest split (many items per block, empty ones among them).
TEST(CudaAttentionTc, MatchesReferenceAndCpu) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  const int H = 2;
  // 48-token pages: tile pairs (32 tokens) inside a page and across two;
  // 32-token pages: every pair inside one page, and without a window the
  // producer takes its pairs from per-warp descriptor batches (many items a
  // block with the smallest split).
  for (const int P : {16, 32, 48}) {
    const std::vector<int> lens = {1, 0, 2, 15, 16, 17, 31, 33, 47, 49, 255, 256, 257, 4097};
    const AttnCase cases[] = {{"plain", {}},
                              {"softcap+window+sinks", {0.0f, 30.0f, 40, 2}},
                              {"scale", {0.05f, 0.0f, 0, 0}},
                              {"window 300", {0.0f, 0.0f, 300, 0}}};
    Worst worst;
    for (int d : {64, 128, 256})
      for (const auto [kbits, vbits] : {std::pair{4, 4}, std::pair{3, 3}, std::pair{3, 4},
                                        std::pair{4, 3}})
        for (int g : {1, 4, 8}) {
          const int hq = H * g;
          const uint64_t seed = 500 + d * 7 + kbits * 3 + vbits + g * 11;
          const std::string kspec = "tq-mse:b=" + std::to_string(kbits);
          const std::string vspec = "tq-mse:b=" + std::to_string(vbits);
          auto kq = make_quantizer(kspec, d, seed), vq = make_quantizer(vspec, d, seed + 1);
          cuda::GpuKvLayer layer(*kq, *vq, tc_test_config(H, P, int(lens.size()), 4097));
          std::vector<HostSeq> host;
          for (size_t s = 0; s < lens.size(); ++s) {
            layer.add_sequence();
            auto k = kv_data(size_t(lens[s]) * H, d, seed * 100 + s);
            auto v = kv_data(size_t(lens[s]) * H, d, seed * 100 + s + 50);
            layer.append(int(s), k.data(), v.data(), lens[s]);
            host.push_back(download_seq(layer, int(s)));
          }
          const auto q = test::random_gaussian(lens.size() * hq * d, seed + 9);
          cuda::DeviceBuffer dq(q.size() * 4);
          dq.upload(q.data(), q.size() * 4);
          for (const auto& c : cases) {
            const AttnOut ref = run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::reference);
            const AttnOut cpu = cpu_attend_all(layer, host, *kq, *vq, q, hq, c.params);
            for (int split : {0, 1}) {
              SCOPED_TRACE(kspec + " / " + vspec + " d " + std::to_string(d) + " g " +
                           std::to_string(g) + " " + c.name + (split ? " smallest split" : "") +
                           " seed " + std::to_string(seed) + " page " + std::to_string(P));
              const AttnOut tc =
                  run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::tensor_core, split);
              check_tc(host, hq, d, tc, cpu, ref, worst);
              expect_same_bits(tc, run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::tensor_core,
                                              split, /*tensor_copies=*/false));
            }
          }
        }
    worst.print(("tensor-core kernel, " + std::to_string(P) + "-token pages").c_str());
  }
}

// A windowed layer planned as one split a sequence (a short window: at most
// 5 tile pairs a warp, where the split cost model finds the merge kernel
// dearer than the longer split) gets its output from the decode kernel
// itself, no merge kernel (DecodeAttentionParams::direct): bit for bit what
// the merge of that one split writes (the hook turns the direct output off,
// same plan), for every head_dim, GQA 1 and 8 (several combine rounds at d
// 256), tq-mse and outlier-K instantiations, an empty sequence, softcap;
// windows of one pair a warp always take it, sinks never.
TEST(CudaAttentionTc, DirectOutputIsTheMergedSplit) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  struct Restore {
    ~Restore() { cuda::set_decode_tc_direct_output(true); }
  } restore;
  struct Case {
    const char *k, *v;
    int d;
  };
  const int H = 2, P = 16;
  const std::vector<int> lens = {0, 1, 33, 700, 2000};
  for (const Case& c : {Case{"tq-mse:b=4", "tq-mse:b=4", 64}, Case{"tq-mse:b=3", "tq-mse:b=4", 128},
                        Case{"tq-mse:b=4", "tq-mse:b=3", 256}, Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128},
                        Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 256}})
    for (int g : {1, 8}) {
      const int hq = H * g, d = c.d;
      const uint64_t seed = 700 + d + g;
      auto kq = make_quantizer(c.k, d, seed), vq = make_quantizer(c.v, d, seed + 1);
      cuda::GpuKvLayer layer(*kq, *vq, tc_test_config(H, P, int(lens.size()), 2000));
      for (size_t s = 0; s < lens.size(); ++s) {
        layer.add_sequence();
        const auto k = kv_data(size_t(lens[s]) * H, d, seed * 10 + s), v = kv_data(size_t(lens[s]) * H, d, seed * 10 + s + 5);
        layer.append(int(s), k.data(), v.data(), lens[s]);
      }
      const auto q = test::random_gaussian(lens.size() * hq * d, seed + 3);
      cuda::DeviceBuffer dq(q.size() * 4);
      dq.upload(q.data(), q.size() * 4);
      for (const AttentionParams prm : {AttentionParams{0.0f, 0.0f, 1, 0}, AttentionParams{0.0f, 0.0f, 100, 0},
                                        AttentionParams{0.0f, 30.0f, 1024, 0}, AttentionParams{0.0f, 0.0f, 1300, 0},
                                        AttentionParams{0.0f, 0.0f, 100, 2}}) {
        SCOPED_TRACE(std::string(c.k) + " / " + c.v + " d " + std::to_string(d) + " g " + std::to_string(g) +
                     " window " + std::to_string(prm.window) + " sinks " + std::to_string(prm.n_sinks));
        // A window of one pair a warp is one split whatever the batch (the
        // plan's cost model picks it for longer windows where that is faster);
        // sinks never.
        const long before = cuda::decode_tc_direct_launches();
        const AttnOut direct = run_attend(layer, dq, hq, prm, cuda::DecodeKernel::tensor_core);
        const long launched = cuda::decode_tc_direct_launches() - before;
        if (prm.n_sinks > 0) EXPECT_EQ(launched, 0);
        if (prm.n_sinks == 0 && prm.window <= 100) EXPECT_EQ(launched, 1);
        cuda::set_decode_tc_direct_output(false);
        const AttnOut merged = run_attend(layer, dq, hq, prm, cuda::DecodeKernel::tensor_core);
        cuda::set_decode_tc_direct_output(true);
        EXPECT_EQ(cuda::decode_tc_direct_launches() - before, launched) << "the hook did not turn it off";
        expect_same_bits(direct, merged);
        for (int h = 0; h < hq; ++h) EXPECT_EQ(direct.lse[h], kEmptyLse) << "empty sequence 0, head " << h;
        for (int i = 0; i < hq * d; ++i) ASSERT_EQ(direct.out[i], 0.0f) << "empty sequence 0, elem " << i;
      }
    }
}

// attend() with q of type qt (its bytes in dq) and out of type ot: the
// output's bytes and lse, both poisoned first.
struct TypedOut {
  std::vector<uint8_t> out;
  std::vector<float> lse;
};
TypedOut run_attend_typed(const cuda::GpuKvLayer& layer, const cuda::DeviceBuffer& dq, cuda::DType qt, int hq,
                          const AttentionParams& prm, cuda::DType ot) {
  const size_t n = size_t(layer.n_seqs()) * hq * layer.head_dim(), nl = size_t(layer.n_seqs()) * hq;
  TypedOut r{std::vector<uint8_t>(n * cuda::dtype_bytes(ot), 0xff),
             std::vector<float>(nl, std::numeric_limits<float>::quiet_NaN())};
  cuda::DeviceBuffer dout(r.out.size()), dlse(nl * 4), ws(layer.workspace_bytes(hq));
  dout.upload(r.out.data(), r.out.size());
  dlse.upload(r.lse.data(), nl * 4);
  layer.attend(dq.data(), qt, hq, prm, dout.data(), ot, dlse.as<float>(), ws.data(), ws.size());
  dout.download(r.out.data(), r.out.size());
  dlse.download(r.lse.data(), nl * 4);
  return r;
}

// A query and an output in f16 or bf16 (GpuKvLayer::attend with dtypes) give
// what the f32 call gives for the query's values, its output rounded to
// nearest even, bit for bit. Both kernels (tensor cores, reference), plain,
// split-halves and outlier-K formats, the merge's output and the direct
// output of a window's one split, dense tokens (prefix and window), GQA 1
// and 4, head_dim 64 / 128, an empty sequence.
TEST(CudaAttention, HalfPrecisionQueryAndOutput) {
  TQ_SKIP_WITHOUT_GPU();
  struct Case {
    const char *k, *v;
    int d, dense_window, dense_prefix;
  };
  const int H = 2, P = 16;
  const std::vector<int> lens = {0, 1, 45, 700};
  const cuda::DType types[] = {cuda::DType::f32, cuda::DType::f16, cuda::DType::bf16};
  int checked[2] = {0, 0};  // tensor cores, reference
  for (const Case& c : {Case{"tq-mse:b=4", "tq-mse:b=4", 64, 0, 0}, Case{"tq-mse:b=3", "tq-mse:b=4", 128, 0, 0},
                        Case{"tq-mse:b=2.5", "tq-mse:b=2.5", 128, 0, 0},
                        Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128, 0, 0},
                        Case{"tq-mse:b=4", "tq-mse:b=4", 128, 8, 4}})
    for (int g : {1, 4}) {
      const int hq = H * g, d = c.d;
      const uint64_t seed = 900 + d + g + c.dense_window;
      auto kq = make_quantizer(c.k, d, seed), vq = make_quantizer(c.v, d, seed + 1);
      cuda::GpuKvLayerConfig cfg = tc_test_config(H, P, int(lens.size()), 2000);
      cfg.dense_window = c.dense_window;
      cfg.dense_prefix = c.dense_prefix;
      cuda::GpuKvLayer layer(*kq, *vq, cfg);
      for (size_t s = 0; s < lens.size(); ++s) {
        layer.add_sequence();
        const auto k = kv_data(size_t(lens[s]) * H, d, seed * 10 + s),
                   v = kv_data(size_t(lens[s]) * H, d, seed * 10 + s + 5);
        layer.append(int(s), k.data(), v.data(), lens[s]);
      }
      const auto q = test::random_gaussian(lens.size() * hq * d, seed + 3);
      for (cuda::DecodeKernel kern : {cuda::DecodeKernel::tensor_core, cuda::DecodeKernel::reference}) {
        if (kern == cuda::DecodeKernel::tensor_core && layer.attend_kernel(hq) != "tensor_core") continue;
        KernelScope scope(kern, 0);
        for (const AttentionParams prm : {AttentionParams{}, AttentionParams{0.0f, 0.0f, 100, 0},
                                          AttentionParams{0.0f, 30.0f, 0, 2}})
          for (cuda::DType qt : types) {
            const TypedInput tq_in = typed_input(q, qt);
            cuda::DeviceBuffer dq(tq_in.bytes.size()), dqf(q.size() * 4);
            dq.upload(tq_in.bytes.data(), tq_in.bytes.size());
            dqf.upload(tq_in.values.data(), q.size() * 4);
            const TypedOut ref = run_attend_typed(layer, dqf, cuda::DType::f32, hq, prm, cuda::DType::f32);
            for (cuda::DType ot : types) {
              if (qt == cuda::DType::f32 && ot == cuda::DType::f32) continue;
              SCOPED_TRACE(std::string(c.k) + " / " + c.v + " d " + std::to_string(d) + " g " + std::to_string(g) +
                           " dense " + std::to_string(c.dense_window) + " kernel " +
                           (kern == cuda::DecodeKernel::tensor_core ? "tensor_core" : "reference") + " window " +
                           std::to_string(prm.window) + " sinks " + std::to_string(prm.n_sinks) + " q " +
                           cuda::to_string(qt) + " out " + cuda::to_string(ot));
              const TypedOut got = run_attend_typed(layer, dq, qt, hq, prm, ot);
              EXPECT_EQ(std::memcmp(got.lse.data(), ref.lse.data(), ref.lse.size() * 4), 0) << "lse differ";
              std::vector<float> want(ref.out.size() / 4);
              std::memcpy(want.data(), ref.out.data(), ref.out.size());
              const TypedInput want_t = typed_input(want, ot);
              int bad = 0;
              for (size_t i = 0; i < want.size() && bad < 5; ++i) {
                const size_t b = cuda::dtype_bytes(ot);
                if (std::memcmp(got.out.data() + i * b, want_t.bytes.data() + i * b, b) != 0) {
                  ++bad;
                  ADD_FAILURE() << "out element " << i << ": f32 call " << want[i] << ", rounded "
                                << want_t.values[i];
                }
              }
              ++checked[kern == cuda::DecodeKernel::tensor_core ? 0 : 1];
            }
          }
      }
    }
  std::printf("typed query / output cases: %d on tensor cores, %d on the reference kernel\n", checked[0], checked[1]);
  EXPECT_GE(checked[0], 160);  // at least 4 of the 5 formats on tensor cores (attend_kernel may decline one)
  EXPECT_EQ(checked[1], 240);
}

// attend() with the tensor-core kernel's splits planned on the host or on
// the device (SplitPlanning; split: a pinned split, host planning only), and
// the device plan's words from the end of the workspace: {splits a sequence,
// tokens a split} (zeros where the host planned).
struct PlannedOut {
  AttnOut r;
  int n_splits = 0, split = 0;
};
PlannedOut attend_planned(const cuda::GpuKvLayer& layer, const cuda::DeviceBuffer& dq, int hq,
                          const AttentionParams& prm, cuda::SplitPlanning mode, int split = 0) {
  cuda::set_decode_split_planning(mode);
  cuda::set_decode_tc_split_override(split);
  struct Restore {
    ~Restore() {
      cuda::set_decode_split_planning(cuda::SplitPlanning::automatic);
      cuda::set_decode_tc_split_override(0);
    }
  } restore;
  const size_t n = size_t(layer.n_seqs()) * hq * layer.head_dim(), nl = size_t(layer.n_seqs()) * hq;
  PlannedOut r{{std::vector<float>(n), std::vector<float>(nl)}};
  cuda::DeviceBuffer dout(n * 4), dlse(nl * 4), ws(layer.workspace_bytes(hq));
  const std::vector<uint8_t> zeros(ws.size(), 0);
  ws.upload(zeros.data(), zeros.size());
  layer.attend(dq.as<float>(), hq, prm, dout.as<float>(), dlse.as<float>(), ws.data(), ws.size(), nullptr);
  dout.download(r.r.out.data(), n * 4);
  dlse.download(r.r.lse.data(), nl * 4);
  std::vector<uint8_t> h(ws.size());
  ws.download(h.data(), h.size());
  std::memcpy(&r.n_splits, h.data() + h.size() - cuda::kDevicePlanBytes, 4);
  std::memcpy(&r.split, h.data() + h.size() - cuda::kDevicePlanBytes + 4, 4);
  return r;
}

// The device plan (what a captured attend runs) is the host's plan for the
// same lengths: the same split, hence the same outputs bit for bit as an
// attend planned on the host (pinned to the device's split where the host
// would take the direct output of a window instead). Every kernel family
// (d 64 / 128 / 256, 3- and 4-bit, split halves, outlier K), GQA 1 / 4 / 8,
// 16- and 48-token pages, dense tokens, windows, sinks, softcap, an empty
// sequence, and batches of 1, 5 and 40 sequences (a thread then sums
// several sequences of a candidate).
TEST(CudaAttentionTc, DevicePlanIsTheHostPlan) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  struct Case {
    const char *k, *v;
    int d, g, P, dense_window;
    std::vector<int> lens;
  };
  std::vector<int> many;
  for (int s = 0; s < 40; ++s) many.push_back((s * 977 + 31) % 3000);
  const Case cases[] = {{"tq-mse:b=4", "tq-mse:b=4", 128, 4, 16, 0, {3000, 0, 33, 700, 1}},
                        {"tq-mse:b=3", "tq-mse:b=3", 64, 1, 48, 0, {2999}},
                        {"tq-mse:b=4", "tq-mse:b=3", 256, 8, 16, 0, {1000, 2047, 2048}},
                        {"tq-mse:b=2.5", "tq-mse:b=2.5", 128, 4, 16, 0, {1500, 97, 257}},
                        {"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128, 4, 48, 0, {2500, 129}},
                        {"tq-mse:b=4", "tq-mse:b=4", 128, 4, 16, 64, {3000, 70, 0}},
                        {"tq-mse:b=3", "tq-mse:b=4", 128, 4, 16, 0, many}};
  const int H = 2;
  for (const Case& c : cases) {
    const int hq = H * c.g, d = c.d, n = int(c.lens.size());
    auto kq = make_quantizer(c.k, d, 91), vq = make_quantizer(c.v, d, 92);
    cuda::GpuKvLayerConfig cfg = tc_test_config(H, c.P, n, 3000);
    cfg.dense_window = c.dense_window;
    cuda::GpuKvLayer layer(*kq, *vq, cfg);
    ASSERT_EQ(layer.attend_kernel(hq), "tensor_core") << c.k << " / " << c.v << " d " << d;
    for (int s = 0; s < n; ++s) {
      layer.add_sequence();
      const auto k = kv_data(size_t(c.lens[s]) * H, d, 93 + s), v = kv_data(size_t(c.lens[s]) * H, d, 193 + s);
      layer.append(s, k.data(), v.data(), c.lens[s]);
    }
    const auto q = test::random_gaussian(size_t(n) * hq * d, 94);
    cuda::DeviceBuffer dq(q.size() * 4);
    dq.upload(q.data(), q.size() * 4);
    for (const AttentionParams prm : {AttentionParams{}, AttentionParams{0.0f, 30.0f, 0, 0},
                                      AttentionParams{0.0f, 0.0f, 1000, 0}, AttentionParams{0.0f, 0.0f, 300, 3}}) {
      SCOPED_TRACE(std::string(c.k) + " / " + c.v + " d " + std::to_string(d) + " g " + std::to_string(c.g) +
                   " P " + std::to_string(c.P) + " dense " + std::to_string(c.dense_window) + " batch " +
                   std::to_string(n) + " window " + std::to_string(prm.window) + " sinks " +
                   std::to_string(prm.n_sinks) + " softcap " + std::to_string(prm.softcap));
      const PlannedOut dev = attend_planned(layer, dq, hq, prm, cuda::SplitPlanning::device);
      ASSERT_GT(dev.split, 0) << "the device plan's words were not written";
      EXPECT_EQ(dev.split % cuda::decode_tc_tile_tokens(d), 0);
      // Splits cover the longest span (the pages' tokens from the window's start).
      long l_max = 0;
      for (int s = 0; s < n; ++s) {
        const int len = std::max(0, c.lens[s] - c.dense_window);  // tokens in pages (the window's follow)
        l_max = std::max<long>(l_max, len - cuda::decode_split_start(len, prm.window, c.dense_window, prm.n_sinks));
      }
      EXPECT_EQ(dev.n_splits, std::max<long>(1, (l_max + dev.split - 1) / dev.split));
      const PlannedOut pinned = attend_planned(layer, dq, hq, prm, cuda::SplitPlanning::host, dev.split);
      EXPECT_EQ(pinned.split, 0) << "a pinned split is planned on the host";
      expect_same_bits(dev.r, pinned.r);
      if (prm.window == 0) {  // no direct output: the host's own plan is the device's
        const PlannedOut host = attend_planned(layer, dq, hq, prm, cuda::SplitPlanning::host);
        expect_same_bits(dev.r, host.r);
      }
    }
  }
}

// A graph captured while its sequences are short replans the tensor-core
// kernel's splits at every replay (SplitPlanning::automatic: a device plan
// under capture): after they grow, a replay equals an attend planned on the
// host for the new lengths bit for bit, and takes longer splits than it did
// at capture (a host plan would have kept the capture's).
TEST(CudaGraph, CapturedAttendReplansAsSequencesGrow) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, g = 4, hq = H * g, d = 128, P = 64, B = 24, cap = 4096;
  if (cuda::decode_tc_unsupported(decode_shape(d, 4, 4, g, P)) != nullptr)
    GTEST_SKIP() << "this device cannot run the tensor-core kernel";
  auto kq = make_quantizer("tq-mse:b=4", d, 5), vq = make_quantizer("tq-mse:b=4", d, 6);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = H;
  cfg.page_tokens = P;
  cfg.max_seqs = B;
  cfg.max_pages_per_seq = cap / P;
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  const size_t row = size_t(H) * d;
  cuda::DeviceBuffer dk(cap * row * 4), dv(cap * row * 4), dq(size_t(B) * hq * d * 4);
  cuda::bench::fill_normal_f32(dk.as<float>(), cap * row, 31, 0.3f, 1.0f, nullptr);
  cuda::bench::fill_normal_f32(dv.as<float>(), cap * row, 32, 0.0f, 1.0f, nullptr);
  cuda::bench::fill_normal_f32(dq.as<float>(), size_t(B) * hq * d, 33, 0.0f, 1.0f, nullptr);
  for (int s = 0; s < B; ++s) {
    layer.add_sequence();
    layer.append_device(s, dk.as<float>(), dv.as<float>(), 1 + s % 3, nullptr);
  }
  const size_t n = size_t(B) * hq * d, nl = size_t(B) * hq;
  cuda::DeviceBuffer gout(n * 4), glse(nl * 4), gws(layer.workspace_bytes(hq));
  auto replayed = [&](int& split) {
    AttnOut r{std::vector<float>(n), std::vector<float>(nl)};
    gout.download(r.out.data(), n * 4);
    glse.download(r.lse.data(), nl * 4);
    std::vector<uint8_t> h(gws.size());
    gws.download(h.data(), h.size());
    std::memcpy(&split, h.data() + h.size() - cuda::kDevicePlanBytes + 4, 4);
    return r;
  };
  const PlannedOut warm = attend_planned(layer, dq, hq, {}, cuda::SplitPlanning::automatic);  // plans outside the capture first
  EXPECT_EQ(warm.split, 0) << "not captured: planned on the host";
  cuda::bench::CapturedGraph graph;
  graph.begin_capture();
  layer.attend(dq.as<float>(), hq, {}, gout.as<float>(), glse.as<float>(), gws.data(), gws.size(), graph.stream());
  graph.end_capture();
  graph.replay();
  int split_before = 0, split_after = 0;
  expect_same_bits(replayed(split_before), warm.r);
  EXPECT_GT(split_before, 0) << "the captured attend did not plan on the device";

  for (int s = 0; s < B; ++s)  // 1..3 -> 2900..3900 tokens
    layer.append_device(s, dk.as<float>(), dv.as<float>(), 2900 + (s * 131) % 1000 - layer.n_tokens(s), nullptr);
  graph.replay();
  const AttnOut after = replayed(split_after);
  expect_same_bits(after, attend_planned(layer, dq, hq, {}, cuda::SplitPlanning::host).r);
  std::printf("captured attend: split %d tokens at capture (1-3 tokens a sequence), %d after growing to 2900-3899\n",
              split_before, split_after);
  // With a device of up to ~150 SMs (H100 / H200 132, A100 108) the longer
  // sequences fill it with fewer, longer splits.
  if (cuda::bench::device_info().sm_count <= 150) EXPECT_GT(split_after, split_before);
}

// The issue's shapes at 256-token pages: Llama (Hq 32 / Hkv 8 / d 128) and
// Gemma (Hq 4 / Hkv 1 / d 256) with turbo4, turbo3 and paper_mse records,
// lengths up to 16K in one mixed batch; attend()'s default must be the
// tensor-core kernel there.
TEST(CudaAttentionTc, LlamaAndGemmaShapes) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 256)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  struct Shape {
    const char* name;
    int H, g, d;
    std::vector<int> lens;
  };
  const Shape shapes[] = {{"llama", 8, 4, 128, {16384, 1, 255, 256, 257, 4097, 8191, 33}},
                          {"gemma", 1, 4, 256, {16384, 257, 4097, 1}}};
  const struct {
    const char* name;
    int kbits, vbits;
  } presets[] = {{"turbo4", 4, 4}, {"turbo3", 3, 3}, {"paper_mse", 3, 4}};
  const AttnCase cases[] = {{"plain", {}}, {"softcap+window+sinks", {0.0f, 50.0f, 1000, 4}}};
  const int P = 256;
  Worst worst;
  for (const Shape& sh : shapes) {
    const int hq = sh.H * sh.g, d = sh.d, n = int(sh.lens.size());
    std::vector<std::vector<float>> ks, vs;
    for (int s = 0; s < n; ++s) {
      ks.push_back(kv_data(size_t(sh.lens[s]) * sh.H, d, 900 + s));
      vs.push_back(kv_data(size_t(sh.lens[s]) * sh.H, d, 950 + s));
    }
    const auto q = test::random_gaussian(size_t(n) * hq * d, 991);
    cuda::DeviceBuffer dq(q.size() * 4);
    dq.upload(q.data(), q.size() * 4);
    for (const auto& pr : presets) {
      const std::string what = std::string(sh.name) + " " + pr.name;
      SCOPED_TRACE(what);
      EXPECT_EQ(cuda::decode_kernel_for(decode_shape(d, pr.kbits, pr.vbits, sh.g, P)),
                cuda::DecodeKernel::tensor_core);
      auto kq = make_quantizer("tq-mse:b=" + std::to_string(pr.kbits), d, 41);
      auto vq = make_quantizer("tq-mse:b=" + std::to_string(pr.vbits), d, 42);
      cuda::GpuKvLayerConfig cfg;
      cfg.n_heads_kv = sh.H;
      cfg.page_tokens = P;
      cfg.max_seqs = n;
      cfg.max_pages_per_seq = 16384 / P;
      cuda::GpuKvLayer layer(*kq, *vq, cfg);
      std::vector<HostSeq> host;
      for (int s = 0; s < n; ++s) {
        layer.add_sequence();
        layer.append(s, ks[s].data(), vs[s].data(), sh.lens[s]);
        host.push_back(download_seq(layer, s));
      }
      for (const auto& c : cases) {
        SCOPED_TRACE(c.name);
        const AttnOut ref = run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::reference);
        const AttnOut cpu = cpu_attend_all(layer, host, *kq, *vq, q, hq, c.params);
        const AttnOut tc = run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::automatic);
        check_tc(host, hq, d, tc, cpu, ref, worst);
        expect_same_bits(tc, run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::automatic, 0,
                                        /*tensor_copies=*/false));
        // 16K-token splits: more pairs a warp in one item than one descriptor
        // batch holds (64 at d 256), so the producer refills mid-item.
        SCOPED_TRACE("16K-token splits");
        check_tc(host, hq, d,
                 run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::tensor_core, 16384), cpu, ref,
                 worst);
      }
    }
  }
  worst.print("tensor-core kernel, Llama and Gemma shapes");
}

// Norms from 1e-6 to ~4e2 (fp16 subnormal scales) and exact zero vectors in K
// and V: the weights carry the V scale (w = 2^(x - M) s_v with M the max of
// x + log2 s_v), so fp16 keeps its precision whatever the norms.
TEST(CudaAttentionTc, AwkwardNormsAndZeroVectors) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  const int H = 2, P = 16, d = 128, g = 4, hq = H * g;
  const std::vector<int> lens = {1, 23, 100, 300};
  auto kq = make_quantizer("tq-mse:b=4", d, 5), vq = make_quantizer("tq-mse:b=3", d, 6);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = H;
  cfg.page_tokens = P;
  cfg.max_seqs = int(lens.size());
  cfg.max_pages_per_seq = 19;
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  std::vector<HostSeq> host;
  for (size_t s = 0; s < lens.size(); ++s) {
    layer.add_sequence();
    // V awkward everywhere; K awkward in the odd sequences, scaled to norms
    // <= ~4 so that logits stay O(1): at |logit| ~ 400 fp16 queries alone
    // would move them by ~0.1 (a property of fp16, not of the kernel).
    auto k = kv_data(size_t(lens[s]) * H, d, 70 + s);
    if (s % 2) {
      k = awkward_vectors(size_t(lens[s]) * H, d, 70 + s);
      for (float& x : k) x *= 0.01f;
    }
    auto v = awkward_vectors(size_t(lens[s]) * H, d, 80 + s);
    layer.append(int(s), k.data(), v.data(), lens[s]);
    host.push_back(download_seq(layer, int(s)));
  }
  const auto q = test::random_gaussian(lens.size() * hq * d, 17);
  cuda::DeviceBuffer dq(q.size() * 4);
  dq.upload(q.data(), q.size() * 4);
  Worst worst;
  for (const AttentionParams prm : {AttentionParams{}, AttentionParams{0.0f, 20.0f, 50, 1}}) {
    const AttnOut ref = run_attend(layer, dq, hq, prm, cuda::DecodeKernel::reference);
    const AttnOut tc = run_attend(layer, dq, hq, prm, cuda::DecodeKernel::tensor_core);
    check_tc(host, hq, d, tc, cpu_attend_all(layer, host, *kq, *vq, q, hq, prm), ref, worst);
  }
  worst.print("tensor-core kernel, awkward norms");
}

// A channel-split layer (K kspec, V vspec; it chooses its hi channels from
// the first append) of every head_dim in dims, GQA 1 / 4 / 8 at 16-token
// pages and 32 / 48-token pages at GQA 4 (the copy paths), over a mixed
// batch with odd lengths: the tensor-core kernel against the reference
// kernel over the same pages (which stands in for the CPU: both checks of
// check_tc against it), plain, softcap + window + sinks and a window of
// 300, planned and smallest splits; tensor and bulk copies bit-identical.
void check_split_tc_vs_reference(const char* kspec, const char* vspec, std::initializer_list<int> dims,
                                 uint64_t seed0, Worst& worst) {
  const int H = 2;
  const std::vector<int> lens = {1, 0, 17, 31, 33, 49, 256, 257, 2049};
  const AttnCase cases[] = {{"plain", {}},
                            {"softcap+window+sinks", {0.0f, 30.0f, 40, 2}},
                            {"window 300", {0.0f, 0.0f, 300, 0}}};
  for (const int P : {16, 32, 48})
    for (int d : dims)
      for (int g : {1, 4, 8}) {
        if (P != 16 && g != 4) continue;
        const int hq = H * g;
        const uint64_t seed = seed0 + d * 3 + g * 5 + P;
        auto kq = make_quantizer(kspec, d, seed), vq = make_quantizer(vspec, d, seed + 1);
        cuda::GpuKvLayer layer(*kq, *vq, tc_test_config(H, P, int(lens.size()), 2049));
        for (size_t s = 0; s < lens.size(); ++s) {
          layer.add_sequence();
          auto k = kv_data(size_t(lens[s]) * H, d, seed * 100 + s);
          auto v = kv_data(size_t(lens[s]) * H, d, seed * 100 + s + 50);
          layer.append(int(s), k.data(), v.data(), lens[s]);
        }
        EXPECT_EQ(layer.attend_kernel(hq), "tensor_core") << kspec << " / " << vspec << " d " << d;
        const auto q = test::random_gaussian(lens.size() * hq * d, seed + 9);
        cuda::DeviceBuffer dq(q.size() * 4);
        dq.upload(q.data(), q.size() * 4);
        std::vector<HostSeq> host(lens.size());
        for (size_t s = 0; s < lens.size(); ++s) host[s].len = lens[s];
        for (const auto& c : cases) {
          const AttnOut ref = run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::reference);
          for (int split : {0, 1}) {
            SCOPED_TRACE(std::string(kspec) + " / " + vspec + " d " + std::to_string(d) + " g " + std::to_string(g) +
                         " " + c.name + (split ? " smallest split" : "") + " page " + std::to_string(P));
            const AttnOut tc = run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::tensor_core, split);
            check_tc(host, hq, d, tc, ref, ref, worst);
            expect_same_bits(tc, run_attend(layer, dq, hq, c.params, cuda::DecodeKernel::tensor_core, split,
                                            /*tensor_copies=*/false));
          }
        }
      }
}

// Channel splits in two halves (turbo2.5, turbo3.5) on the tensor-core
// kernel: each half's codes through its own table, the scores and weights
// with each half's scales. Against the reference kernel (itself checked
// against KvCache in CudaSplit below) over the same pages: every head_dim,
// GQA group and page size of MatchesReferenceAndCpu, a mixed batch with odd
// lengths, softcap + window + sinks, planned and smallest splits; tensor and
// bulk copies bit-identical. Other splits stay on the reference kernel.
TEST(CudaAttentionTc, ChannelSplitHalvesMatchReference) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  Worst worst;
  for (const char* spec : {"tq-mse:b=2.5", "tq-mse:b=3.5"})
    check_split_tc_vs_reference(spec, spec, {64, 128, 256}, 700, worst);
  worst.print("tensor-core kernel, channel-split halves (vs reference kernel)");
  // Splits the kernel does not take, each with its reason: f32 scales, a
  // split V under plain K, outlier channels of another count or width, or
  // at d 64, or beside a 3-bit V.
  struct Other {
    const char *k, *v;
    int d;
    const char* why;
  };
  for (const Other& o : {Other{"tq-mse:b=2.5,sf=f32", "tq-mse:b=2.5,sf=f32", 128, "channel-split"},
                         Other{"tq-mse:b=4", "tq-mse:b=2.5", 128, "channel-split"},
                         Other{"tq-mse:b=4,hi=25%,hb=6", "tq-mse:b=4", 128, "channel-split"},
                         Other{"tq-mse:b=4,hi=12.5%,hb=5", "tq-mse:b=4", 128, "outlier channels in K must have hb=6"},
                         Other{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 64, "outlier channels in K need head_dim"},
                         Other{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=3", 128, "outlier channels in K run beside"}}) {
    auto kq = make_quantizer(o.k, o.d, 3), vq = make_quantizer(o.v, o.d, 4);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = 2;
    cfg.page_tokens = 16;
    cfg.max_seqs = 1;
    cfg.max_pages_per_seq = 4;
    cuda::GpuKvLayer layer(*kq, *vq, cfg);
    const std::string why = layer.attend_kernel(8);
    EXPECT_EQ(why.rfind(std::string("reference: ") + o.why, 0), 0u) << o.k << " / " << o.v << ": " << why;
  }
}

// Outlier channels in K (turbo4-out, paper_mse-out: head_dim/8 channels at 6
// bits with their own rotation, the rest at 4 or 3 bits with a two-round
// rotation) beside a plain 4-bit V on the tensor-core kernel: the queries
// rotated per segment by the GQA group's warps, the hi codes through a
// single-code table, each segment's score with its scale; d 128 and 256
// (check_split_tc_vs_reference).
TEST(CudaAttentionTc, OutlierChannelsInKMatchReference) {
  TQ_SKIP_WITHOUT_GPU();
  if (const char* why = cuda::decode_tc_unsupported(decode_shape(128, 4, 4, 4, 16)))
    GTEST_SKIP() << "this device cannot run the tensor-core kernel: " << why;
  Worst worst;
  for (const char* kspec : {"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=3,hi=12.5%,hb=6"})
    check_split_tc_vs_reference(kspec, "tq-mse:b=4", {128, 256}, 900, worst);
  worst.print("tensor-core kernel, outlier channels in K (vs reference kernel)");
}

// (CudaSplit.AppendInputTypesAgree, below.) The split append kernels -- the
// halves' (two lanes a vector at d 64 / 128 / 256) and the -out presets'
// (turbo4-out / paper_mse-out keys at d 128 / 256) -- read every input type:
// a layer appended from f16 or bf16 holds the records of one appended from
// the same values in f32 (the f32 path is checked against KvCache in
// RecordsAndAttentionMatchKvCache), with zero rows, rows at the
// fp16 limit and tiny values among them, and both choose the same hi
// channels; under round_to f32 too (f32 input then takes the kernel's
// ungathered path).
// reserve_steps / append_step_device: a decode step captured in a CUDA
// graph (append, then attend) and replayed writes the records that
// append_batch_device writes for the same tokens (bit for bit) and attends
// like direct calls; a replay past the reservation, or with a NaN, is
// dropped on the device with every later one, check_appends() throws once
// and the layer holds every token before it; the host refuses what it can
// check before anything runs. Every append kernel takes part: tq-mse at d
// 64 / 128 / 256 (bf16 input), the two-lanes split kernel (turbo2.5, f32),
// the warp split kernels (b=1.5 halves; outlier channels in K beside a
// tq-mse V, f16 input); split hi channels chosen by the prefill.
TEST(CudaGraph, CapturedDecodeStepsMatchBatchAppends) {
  TQ_SKIP_WITHOUT_GPU();
  using cuda::DType;
  struct Case {
    const char *kspec, *vspec;
    DType dtype;
    int d;
  };
  for (const Case& c : {Case{"tq-mse:b=4", "tq-mse:b=4", DType::bf16, 128},
                        Case{"tq-mse:b=2.5", "tq-mse:b=2.5", DType::f32, 128},
                        Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", DType::f16, 128},
                        Case{"tq-mse:b=1.5", "tq-mse:b=1.5", DType::bf16, 64},
                        Case{"tq-mse:b=3", "tq-mse:b=3", DType::bf16, 256}}) {
    const DType dtype = c.dtype;
    SCOPED_TRACE(std::string(c.kspec) + " / " + c.vspec + " d " + std::to_string(c.d) + " input " +
                 cuda::to_string(dtype));
    auto kq = make_quantizer(c.kspec, c.d, 5), vq = make_quantizer(c.vspec, c.d, 6);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = 2;
    cfg.page_tokens = 16;
    cfg.max_seqs = 4;
    cfg.max_pages_per_seq = 8;
    cuda::GpuKvLayer ref(*kq, *vq, cfg);
    cuda::GpuKvLayer graph_layer(*kq, *vq, cfg);
    const int H = 2, d = c.d, hq = 8, steps = 37, n_max = 30 + steps + 4;
    const size_t row = size_t(H) * d;
    const std::vector<int> prompt = {30, 5, 16};
    const auto k = kv_data(size_t(3) * n_max * H, d, 81), v = kv_data(size_t(3) * n_max * H, d, 82);
    auto tok = [&](const std::vector<float>& x, int s, int t) { return x.data() + (size_t(s) * n_max + t) * row; };
    for (cuda::GpuKvLayer* l : {&ref, &graph_layer})
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(l->add_sequence(), s);
        l->append(s, tok(k, s, 0), tok(v, s, 0), prompt[s]);
      }
    // The batch in an order other than the ids': rows 0, 1, 2 are sequences 2, 0, 1.
    const std::vector<int> batch = {2, 0, 1};
    const size_t es = dtype == DType::f32 ? 4 : 2;
    cuda::DeviceBuffer bk(3 * row * es), bv(3 * row * es), fk(3 * row * 4), fv(3 * row * 4);
    auto upload_step = [&](int step, bool nan) {  // rows in batch order; ref gets the same values as f32
      std::vector<float> kb(3 * row), vb(3 * row);
      for (int i = 0; i < 3; ++i) {
        const int s = batch[i];
        std::copy(tok(k, s, prompt[s] + step), tok(k, s, prompt[s] + step) + row, kb.begin() + i * row);
        std::copy(tok(v, s, prompt[s] + step), tok(v, s, prompt[s] + step) + row, vb.begin() + i * row);
      }
      if (nan) kb[row + 5] = std::numeric_limits<float>::quiet_NaN();
      upload_typed_rows(kb, vb, dtype, bk, bv, fk, fv);
    };
    const size_t nq = size_t(3) * hq * d;
    const auto q = test::random_gaussian(nq, 83);
    cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), gout(nq * 4), ws(ref.workspace_bytes(hq)),
        gws(ref.workspace_bytes(hq));
    dq.upload(q.data(), nq * 4);
    auto host = [&](const cuda::DeviceBuffer& b) {
      std::vector<float> h(nq);
      b.download(h.data(), nq * 4);
      return h;
    };
    auto ref_attend = [&] {
      ref.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
      return host(dout);
    };
    auto same_records = [&](const char* when) {
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(graph_layer.n_tokens(s), ref.n_tokens(s)) << when << ": sequence " << s;
        const int n = ref.n_tokens(s);
        std::vector<uint8_t> gk(size_t(n) * H * ref.k_record_bytes()), gv(size_t(n) * H * ref.v_record_bytes());
        std::vector<uint8_t> rk(gk.size()), rv(gv.size());
        graph_layer.read_records(s, 0, n, gk.data(), gv.data());
        ref.read_records(s, 0, n, rk.data(), rv.data());
        EXPECT_TRUE(gk == rk) << when << ": K records of sequence " << s;
        EXPECT_TRUE(gv == rv) << when << ": V records of sequence " << s;
      }
    };

    // Refused on the host before anything runs.
    EXPECT_THROW(graph_layer.append_step_device(bk.data(), bv.data(), dtype), Error);  // no batch yet
    const std::vector<int> twice = {1, 1}, unknown = {0, 3};
    EXPECT_THROW(graph_layer.reserve_steps(twice.data(), 2, 4), Error);
    EXPECT_THROW(graph_layer.reserve_steps(unknown.data(), 2, 4), Error);
    EXPECT_THROW(graph_layer.reserve_steps(batch.data(), 3, 0), Error);
    EXPECT_THROW(graph_layer.reserve_steps(batch.data(), 3, 8 * 16), Error);  // past max_pages_per_seq
    graph_layer.reserve_steps(batch.data(), 3, steps);
    EXPECT_THROW(graph_layer.append_step_device(static_cast<uint8_t*>(bk.data()) + 4, bv.data(), dtype), Error);
    for (int s = 0; s < 3; ++s) EXPECT_EQ(graph_layer.n_tokens(s), prompt[s]) << "a reservation appends nothing";

    (void)ref_attend();  // warms the per-device caches of attend (kernel attributes, slots)
    cuda::bench::CapturedGraph graph;
    graph.begin_capture();
    graph_layer.append_step_device(bk.data(), bv.data(), dtype, graph.stream());
    graph_layer.attend(dq.as<float>(), hq, {}, gout.as<float>(), nullptr, gws.data(), gws.size(), graph.stream());
    graph.end_capture();
    double worst = 0;
    for (int step = 0; step < steps; ++step) {
      upload_step(step, false);
      graph.replay();
      ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
      const std::vector<float> want = ref_attend(), got = host(gout);
      worst = std::max(worst, norm_err(got.data(), want.data(), nq));
    }
    // (the captured attend keeps the split planned at capture; direct calls plan from the current lengths)
    EXPECT_LE(worst, 1e-5) << "captured attend after captured steps vs direct calls";
    EXPECT_EQ(graph_layer.n_tokens(0), prompt[0]) << "steps are counted by check_appends only";
    graph_layer.check_appends();
    same_records("after the captured steps");

    // One step past the reservation: dropped, with the clean ones after it.
    const std::vector<float> before = ref_attend();
    upload_step(steps, false);
    graph.replay();
    graph.replay();
    {
      const std::vector<float> got = host(gout);
      EXPECT_LE(norm_err(got.data(), before.data(), nq), 1e-5) << "a refused step changed the attention";
    }
    EXPECT_THROW(graph_layer.check_appends(), Error);
    graph_layer.check_appends();  // reported once
    same_records("after a step past the reservation");

    // A NaN in the middle of a run of steps: that step and the later ones are dropped.
    graph_layer.reserve_steps(batch.data(), 3, 4);
    upload_step(steps, false);
    graph.replay();
    ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
    upload_step(steps + 1, true);
    graph.replay();
    EXPECT_THROW(ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>()), Error);
    upload_step(steps + 1, false);
    graph.replay();
    EXPECT_THROW(graph_layer.check_appends(), Error);
    same_records("after a refused step");
    // The reservation was given up: replays are refused until the next one.
    graph.replay();
    EXPECT_THROW(graph_layer.check_appends(), Error);
    graph_layer.reserve_steps(batch.data(), 3, 2);
    graph.replay();
    ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
    graph_layer.check_appends();
    same_records("after a new reservation");
    // Host appends go on from the steps' tokens, using the reserved pages first.
    const std::vector<int> seq1 = {1};
    graph_layer.reserve_steps(seq1.data(), 1, 20);
    graph_layer.append(1, tok(k, 1, 60), tok(v, 1, 60), 3);
    ref.append(1, tok(k, 1, 60), tok(v, 1, 60), 3);
    same_records("after host appends past the steps");
  }
}

// Captured steps on layers with dense tokens (dense_window / dense_prefix):
// the device plans each step's moves (prefix, ring, the ring's oldest token
// into the pages) from its own states, so replays give what
// append_batch_device gives for the same tokens: the same compressed
// records bit for bit, the same token counts, attention within 1e-5 at every
// step (the dense rows take part). Sequences start inside the prefix, inside
// the window and past both, so rows change role during the steps. A NaN, an
// f16 overflow (|x| > 65504) and a step past the reservation are dropped
// with every later step; a step whose token stays dense needs no page.
TEST(CudaGraph, CapturedDecodeStepsWithDenseTokens) {
  TQ_SKIP_WITHOUT_GPU();
  using cuda::DType;
  struct Case {
    const char *kspec, *vspec;
    DType dtype;
    int d, window, prefix;
    std::vector<int> prompt;
  };
  for (const Case& c : {Case{"tq-mse:b=4", "tq-mse:b=3", DType::bf16, 128, 8, 2, {30, 1, 9}},
                        Case{"tq-mse:b=2", "tq-mse:b=2", DType::f32, 64, 0, 3, {5, 1, 2}},
                        Case{"tq-mse:b=4", "tq-mse:b=4", DType::f16, 256, 6, 0, {3, 20, 6}},
                        Case{"tq-mse:b=2.5", "tq-mse:b=2.5", DType::f32, 128, 5, 1, {40, 2, 7}},
                        Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", DType::bf16, 128, 4, 1, {35, 2, 8}}}) {
    const DType dtype = c.dtype;
    const int S = c.prefix, W = c.window;
    SCOPED_TRACE(std::string(c.kspec) + " / " + c.vspec + " d " + std::to_string(c.d) + " window " +
                 std::to_string(W) + " prefix " + std::to_string(S) + " input " + cuda::to_string(dtype));
    auto kq = make_quantizer(c.kspec, c.d, 5), vq = make_quantizer(c.vspec, c.d, 6);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = 2;
    cfg.page_tokens = 16;
    cfg.max_seqs = 4;
    cfg.max_pages_per_seq = 8;
    cfg.dense_window = W;
    cfg.dense_prefix = S;
    cuda::GpuKvLayer ref(*kq, *vq, cfg);
    cuda::GpuKvLayer graph_layer(*kq, *vq, cfg);
    const int H = 2, d = c.d, hq = 8, steps = 24, n_max = 40 + steps + 16;
    const size_t row = size_t(H) * d;
    const auto k = kv_data(size_t(3) * n_max * H, d, 91), v = kv_data(size_t(3) * n_max * H, d, 92);
    auto tok = [&](const std::vector<float>& x, int s, int t) { return x.data() + (size_t(s) * n_max + t) * row; };
    for (cuda::GpuKvLayer* l : {&ref, &graph_layer})
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(l->add_sequence(), s);
        l->append(s, tok(k, s, 0), tok(v, s, 0), c.prompt[s]);
      }
    const std::vector<int> batch = {2, 0, 1};  // rows 0, 1, 2 are sequences 2, 0, 1
    const size_t es = dtype == DType::f32 ? 4 : 2;
    cuda::DeviceBuffer bk(3 * row * es), bv(3 * row * es), fk(3 * row * 4), fv(3 * row * 4);
    // Step `step`'s rows in batch order; ref gets the same values as f32. bad: 1 NaN, 2 beyond f16.
    auto upload_step = [&](int step, int bad) {
      std::vector<float> kb(3 * row), vb(3 * row);
      for (int i = 0; i < 3; ++i) {
        const int s = batch[i];
        std::copy(tok(k, s, c.prompt[s] + step), tok(k, s, c.prompt[s] + step) + row, kb.begin() + i * row);
        std::copy(tok(v, s, c.prompt[s] + step), tok(v, s, c.prompt[s] + step) + row, vb.begin() + i * row);
      }
      if (bad == 1) kb[row + 5] = std::numeric_limits<float>::quiet_NaN();
      if (bad == 2) vb[2 * row + 3] = 70000.0f;
      upload_typed_rows(kb, vb, dtype, bk, bv, fk, fv);
    };
    const size_t nq = size_t(3) * hq * d;
    const auto q = test::random_gaussian(nq, 93);
    cuda::DeviceBuffer dq(nq * 4), dout(nq * 4), gout(nq * 4), ws(ref.workspace_bytes(hq)),
        gws(ref.workspace_bytes(hq));
    dq.upload(q.data(), nq * 4);
    auto host = [&](const cuda::DeviceBuffer& b) {
      std::vector<float> h(nq);
      b.download(h.data(), nq * 4);
      return h;
    };
    auto ref_attend = [&] {
      ref.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, ws.data(), ws.size());
      return host(dout);
    };
    // Compressed tokens: positions [min(n, S), n - W) once the prefix is full.
    auto same_layers = [&](const char* when) {
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(graph_layer.n_tokens(s), ref.n_tokens(s)) << when << ": sequence " << s;
        const int n = ref.n_tokens(s), first = std::min(n, S), n_rec = std::max(0, n - S - W);
        std::vector<uint8_t> gk(size_t(n_rec) * H * ref.k_record_bytes()), gv(size_t(n_rec) * H * ref.v_record_bytes());
        std::vector<uint8_t> rk(gk.size()), rv(gv.size());
        graph_layer.read_records(s, first, n_rec, gk.data(), gv.data());
        ref.read_records(s, first, n_rec, rk.data(), rv.data());
        EXPECT_TRUE(gk == rk) << when << ": K records of sequence " << s;
        EXPECT_TRUE(gv == rv) << when << ": V records of sequence " << s;
      }
      const std::vector<float> want = ref_attend();
      graph_layer.attend(dq.as<float>(), hq, {}, dout.as<float>(), nullptr, gws.data(), gws.size());
      const std::vector<float> got = host(dout);
      EXPECT_LE(norm_err(got.data(), want.data(), nq), 1e-5) << when << ": direct attend";
    };

    graph_layer.reserve_steps(batch.data(), 3, steps);
    (void)ref_attend();
    cuda::bench::CapturedGraph graph;
    graph.begin_capture();
    graph_layer.append_step_device(bk.data(), bv.data(), dtype, graph.stream());
    graph_layer.attend(dq.as<float>(), hq, {}, gout.as<float>(), nullptr, gws.data(), gws.size(), graph.stream());
    graph.end_capture();
    double worst = 0;
    for (int step = 0; step < steps; ++step) {
      upload_step(step, 0);
      graph.replay();
      ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
      const std::vector<float> want = ref_attend(), got = host(gout);
      worst = std::max(worst, norm_err(got.data(), want.data(), nq));
    }
    EXPECT_LE(worst, 1e-5) << "captured attend after captured steps vs direct calls";
    graph_layer.check_appends();
    same_layers("after the captured steps");

    // A NaN, then (a new reservation) an f16 overflow: that step and the later ones are dropped.
    for (const int bad : {1, 2}) {
      graph_layer.reserve_steps(batch.data(), 3, 4);
      int step = steps + 2 * bad;
      upload_step(step, 0);
      graph.replay();
      ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
      upload_step(step + 1, bad);
      graph.replay();
      EXPECT_THROW(ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>()), Error);
      upload_step(step + 1, 0);
      graph.replay();
      EXPECT_THROW(graph_layer.check_appends(), Error);
      same_layers(bad == 1 ? "after a NaN step" : "after an f16 overflow step");
      // Both layers take the clean token the refused step had.
      graph_layer.reserve_steps(batch.data(), 3, 1);
      graph.replay();
      ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
      graph_layer.check_appends();
      same_layers("after the clean step");
    }
    // Past the reservation: sequence 0 (row 1) is past its prefix and window,
    // so each step moves a token into its pages; the third of two reserved is dropped.
    graph_layer.reserve_steps(batch.data(), 3, 2);
    for (int i = 0; i < 3; ++i) {
      upload_step(steps + 6 + i, 0);
      graph.replay();
      if (i < 2) ref.append_batch_device(batch.data(), 3, fk.as<float>(), fv.as<float>());
    }
    EXPECT_THROW(graph_layer.check_appends(), Error);
    same_layers("after a step past the reservation");
    // Host appends go on from the steps' tokens.
    graph_layer.append(1, tok(k, 1, 60), tok(v, 1, 60), 3);
    ref.append(1, tok(k, 1, 60), tok(v, 1, 60), 3);
    same_layers("after host appends past the steps");
  }
}

// The step kernel (src/cuda/mse_step.cu: a captured step's K and V in one
// launch, a warp per tq-mse vector or per half of a two-halves split or per
// outlier-split K vector) writes the records of the tile kernels
// (append_batch_device, same typed input) bit for bit: every width 1-8 (table
// and binary searches), d 64 / 128 / 256, K and V of different widths and an
// f32 scale, turbo2.5 / turbo3.5 halves, outlier channels in K (turbo4-out,
// paper_mse-out) beside tq-mse V at d 64 / 128 / 256,
// f32 / f16 / bf16 input under round_to f16 / bf16 / f32, on awkward rows
// (magnitudes 1e-6 .. 1e1: f16 subnormals; zero vectors and zero components;
// components at the fp16 limit), over page boundaries.
TEST(CudaGraph, StepKernelMatchesTileKernels) {
  TQ_SKIP_WITHOUT_GPU();
  using cuda::DType;
  struct Case {
    const char *kspec, *vspec;
    int d;
    DType in, round_to;
  };
  std::vector<Case> cases;
  for (int b = 1; b <= 8; ++b) {
    static const char* specs[] = {"", "tq-mse:b=1", "tq-mse:b=2", "tq-mse:b=3", "tq-mse:b=4",
                                  "tq-mse:b=5", "tq-mse:b=6", "tq-mse:b=7", "tq-mse:b=8"};
    cases.push_back({specs[b], specs[b], b % 3 == 0 ? 64 : b % 3 == 1 ? 128 : 256,
                     b % 2 ? DType::bf16 : DType::f32, DType::f16});
  }
  cases.push_back({"tq-mse:b=3", "tq-mse:b=4", 128, DType::f16, DType::f16});
  cases.push_back({"tq-mse:b=4,sf=f32", "tq-mse:b=4", 128, DType::f32, DType::f32});
  cases.push_back({"tq-mse:b=4", "tq-mse:b=2", 256, DType::f16, DType::bf16});
  cases.push_back({"tq-mse:b=3", "tq-mse:b=3", 64, DType::bf16, DType::bf16});
  cases.push_back({"tq-mse:b=2", "tq-mse:b=2", 128, DType::f32, DType::bf16});
  cases.push_back({"tq-mse:b=2.5", "tq-mse:b=2.5", 128, DType::f32, DType::f16});
  cases.push_back({"tq-mse:b=3.5", "tq-mse:b=3.5", 64, DType::bf16, DType::bf16});
  cases.push_back({"tq-mse:b=2.5", "tq-mse:b=3.5", 256, DType::f16, DType::f16});
  cases.push_back({"tq-mse:b=3.5", "tq-mse:b=2.5", 128, DType::bf16, DType::f32});
  cases.push_back({"tq-mse:b=2.5,sf=f32", "tq-mse:b=1.5", 64, DType::f32, DType::f32});
  cases.push_back({"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128, DType::f32, DType::f16});
  cases.push_back({"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 256, DType::bf16, DType::f16});
  cases.push_back({"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=3", 64, DType::f16, DType::bf16});
  cases.push_back({"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=6", 128, DType::bf16, DType::f32});
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.kspec) + " / " + c.vspec + " d " + std::to_string(c.d) + " input " +
                 cuda::to_string(c.in) + " round_to " + cuda::to_string(c.round_to));
    auto kq = make_quantizer(c.kspec, c.d, 11), vq = make_quantizer(c.vspec, c.d, 12);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = 3;
    cfg.page_tokens = 16;
    cfg.max_seqs = 3;
    cfg.max_pages_per_seq = 4;
    cfg.round_to = c.round_to;
    cuda::GpuKvLayer ref(*kq, *vq, cfg), step(*kq, *vq, cfg);
    // The cases are chosen for the step kernel: a silent fallback to the
    // tile kernels would compare them with themselves.
    EXPECT_EQ(step.step_kernel().rfind("step kernel", 0), 0u) << step.step_kernel();
    const int H = 3, d = c.d, steps = 12;
    const std::vector<int> prompt = {5, 14, 1}, batch = {1, 2, 0};
    const auto pk = kv_data(size_t(3) * 16 * H, d, 41), pv = kv_data(size_t(3) * 16 * H, d, 42);
    for (cuda::GpuKvLayer* l : {&ref, &step})
      for (int s = 0; s < 3; ++s) {
        ASSERT_EQ(l->add_sequence(), s);
        l->append(s, pk.data() + size_t(s) * 16 * H * d, pv.data() + size_t(s) * 16 * H * d, prompt[s]);
      }
    step.reserve_steps(batch.data(), 3, steps);
    const TypedInput tk = typed_input(append_vectors(size_t(steps) * 3 * H, d, 43), c.in);
    const TypedInput tv = typed_input(append_vectors(size_t(steps) * 3 * H, d, 44), c.in);
    cuda::DeviceBuffer dk(tk.bytes.size()), dv(tv.bytes.size());
    dk.upload(tk.bytes.data(), tk.bytes.size());
    dv.upload(tv.bytes.data(), tv.bytes.size());
    const size_t step_bytes = size_t(3) * H * d * cuda::dtype_bytes(c.in);
    for (int i = 0; i < steps; ++i) {
      const uint8_t* k = static_cast<const uint8_t*>(dk.data()) + i * step_bytes;
      const uint8_t* v = static_cast<const uint8_t*>(dv.data()) + i * step_bytes;
      step.append_step_device(k, v, c.in);
      ref.append_batch_device(batch.data(), 3, k, v, c.in);
    }
    step.check_appends();
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(step.n_tokens(s), prompt[s] + steps);
      const int n = step.n_tokens(s);
      std::vector<uint8_t> gk(size_t(n) * H * ref.k_record_bytes()), gv(size_t(n) * H * ref.v_record_bytes());
      std::vector<uint8_t> rk(gk.size()), rv(gv.size());
      step.read_records(s, 0, n, gk.data(), gv.data());
      ref.read_records(s, 0, n, rk.data(), rv.data());
      EXPECT_TRUE(gk == rk) << "K records of sequence " << s;
      EXPECT_TRUE(gv == rv) << "V records of sequence " << s;
    }
  }
}

TEST(CudaSplit, AppendInputTypesAgree) {
  TQ_SKIP_WITHOUT_GPU();
  using cuda::DType;
  const int H = 2, P = 16, n = 150;
  struct Case {
    const char *kspec, *vspec;
    int d;
  };
  for (const Case& c : {Case{"tq-mse:b=2.5", "tq-mse:b=2.5", 128}, Case{"tq-mse:b=3.5", "tq-mse:b=3.5", 64},
                        Case{"tq-mse:b=3.5", "tq-mse:b=3.5", 128}, Case{"tq-mse:b=2.5", "tq-mse:b=2.5", 256},
                        // the -out presets' kernel at both widths and dims
                        Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128},
                        Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 128},
                        Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 256},
                        Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 256}})
    for (const auto [in, rt] : {std::pair{DType::f16, DType::f16}, std::pair{DType::bf16, DType::f16},
                                std::pair{DType::bf16, DType::bf16}, std::pair{DType::f16, DType::bf16},
                                std::pair{DType::f16, DType::f32}, std::pair{DType::bf16, DType::f32}}) {
      const int d = c.d;
      SCOPED_TRACE(std::string(c.kspec) + " / " + c.vspec + " d " + std::to_string(d) + " input " +
                   cuda::to_string(in) + " round_to " + cuda::to_string(rt));
      auto kq = make_quantizer(c.kspec, d, 5), vq = make_quantizer(c.vspec, d, 6);
      const auto k = append_vectors(size_t(n) * H, d, 77), v = append_vectors(size_t(n) * H, d, 78);
      const TypedInput tk = typed_input(k, in), tv = typed_input(v, in);
      cuda::GpuKvLayerConfig cfg;
      cfg.n_heads_kv = H;
      cfg.page_tokens = P;
      cfg.max_seqs = 1;
      cfg.max_pages_per_seq = (n + P - 1) / P;
      cfg.round_to = rt;
      cuda::GpuKvLayer typed(*kq, *vq, cfg), ref(*kq, *vq, cfg);
      typed.add_sequence();
      ref.add_sequence();
      cuda::DeviceBuffer dk(tk.bytes.size()), dv(tv.bytes.size());
      dk.upload(tk.bytes.data(), tk.bytes.size());
      dv.upload(tv.bytes.data(), tv.bytes.size());
      typed.append_device(0, dk.data(), dv.data(), n, in);
      cuda::DeviceBuffer fk(tk.values.size() * 4), fv(tv.values.size() * 4);
      fk.upload(tk.values.data(), tk.values.size() * 4);
      fv.upload(tv.values.data(), tv.values.size() * 4);
      ref.append_device(0, fk.as<float>(), fv.as<float>(), n);
      std::vector<uint8_t> ak(size_t(n) * H * typed.k_record_bytes()), av(size_t(n) * H * typed.v_record_bytes());
      std::vector<uint8_t> bk(ak.size()), bv(av.size());
      typed.read_records(0, 0, n, ak.data(), av.data());
      ref.read_records(0, 0, n, bk.data(), bv.data());
      EXPECT_TRUE(ak == bk) << "K records differ";
      EXPECT_TRUE(av == bv) << "V records differ";
      for (int h = 0; h < H; ++h)
        for (const bool key : {true, false}) EXPECT_EQ(typed.hi_channels(h, key), ref.hi_channels(h, key));
    }
}

// Channel-split formats (turbo2.5, turbo3.5, turbo4-out, paper_mse-out's
// keys; split V too) on the GPU: with the KvCache's per-head outlier
// channels, the records are the KvCache's bit for bit (host and device
// appends, batched decode steps, dense window and prefix), and attention is
// within 1e-3 of KvCache::attend, sliding window and softcap included
// (turbo2.5 / turbo3.5 through the tensor-core kernel, once with a dense
// window and prefix; the other splits through the reference kernel). The
// segments' dims cover one-round rotations (64, 32, 128) and two-round ones
// (112, 56, 224: not powers of two), down to 8 channels.
TEST(CudaSplit, RecordsAndAttentionMatchKvCache) {
  TQ_SKIP_WITHOUT_GPU();
  struct Case {
    const char *k, *v;
    int d, group, window, prefix;
  };
  double worst = 0;
  for (const Case c : {Case{"tq-mse:b=2.5", "tq-mse:b=2.5", 128, 4, 0, 0},
                       Case{"tq-mse:b=3.5", "tq-mse:b=3.5", 64, 1, 0, 0},
                       Case{"tq-mse:b=3.5", "tq-mse:b=3.5", 256, 8, 16, 4},  // tensor cores + dense part
                       Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 128, 8, 16, 4},
                       Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 256, 4, 8, 2},
                       Case{"tq-mse:b=3,hi=12.5%,hb=6", "tq-mse:b=4", 128, 4, 0, 0},
                       Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=4", 256, 8, 0, 0},
                       Case{"tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=2.5,hi=32%", 64, 4, 0, 3},
                       Case{"tq-mse:b=4", "tq-mse:b=2.5,sf=f32", 128, 2, 0, 0}}) {
    SCOPED_TRACE(std::string("K ") + c.k + " V " + c.v + " d " + std::to_string(c.d) + " window " +
                 std::to_string(c.window) + " prefix " + std::to_string(c.prefix));
    KvCacheConfig cc;
    cc.n_layers = 1;
    cc.n_heads_kv = 2;
    cc.head_dim = c.d;
    cc.k_format = parse_format(c.k);
    cc.v_format = parse_format(c.v);
    cc.page_tokens = 16;
    cc.dense_window = c.window;
    cc.dense_prefix = c.prefix;
    cc.seed = 51;
    KvCache cache(cc);
    const int H = cc.n_heads_kv, d = c.d, g = c.group, hq = H * g;
    const size_t row = size_t(H) * d;
    const std::vector<int> lens = {3, 40, 150};
    const int steps = 3;
    std::vector<std::vector<float>> ks, vs;
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(cache.add_sequence(), s);
      const size_t n = size_t(lens[s] + steps) * H;
      // Sequence 1's keys: magnitudes from 1e-6 to 10, zero vectors, huge channels.
      ks.push_back(s == 1 ? awkward_vectors(n, d, 900 + s) : kv_data(n, d, 900 + s));
      vs.push_back(kv_data(n, d, 950 + s));
      for (auto* a : {&ks.back(), &vs.back()})  // f16 values: the GPU's device appends get them exactly
        for (float& x : *a) x = half_to_float(float_to_half(x));
    }
    // The CPU cache first, so that it has chosen its outlier channels.
    for (int s = 0; s < 3; ++s) cache.append(s, 0, ks[s].data(), vs[s].data(), lens[s]);
    for (int step = 0; step < steps; ++step)
      for (int s = 0; s < 3; ++s) {
        const size_t at = size_t(lens[s] + step) * row;
        cache.append(s, 0, ks[s].data() + at, vs[s].data() + at, 1);
      }
    cuda::GpuKvLayerConfig cfg = layer_config_like(cc, 3);
    for (int h = 0; h < H; ++h) {
      if (is_split(cc.k_format)) cfg.k_hi_channels.push_back(cache.outlier_channels(0, h, true));
      if (is_split(cc.v_format)) cfg.v_hi_channels.push_back(cache.outlier_channels(0, h, false));
    }
    cuda::GpuKvLayer layer(cache.k_quantizer(0), cache.v_quantizer(0), cfg);
    // Device appends, and the layer chooses its outlier channels itself
    // from the same first compressed tokens as the cache: the same records.
    cuda::GpuKvLayerConfig auto_cfg = cfg;
    auto_cfg.k_hi_channels.clear();
    auto_cfg.v_hi_channels.clear();
    auto_cfg.round_to = cuda::DType::f16;
    cuda::GpuKvLayer dlayer(cache.k_quantizer(0), cache.v_quantizer(0), auto_cfg);
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(layer.add_sequence(), s);
      ASSERT_EQ(dlayer.add_sequence(), s);
      const int first = std::min(7, lens[s]);
      layer.append(s, ks[s].data(), vs[s].data(), first);
      layer.append(s, ks[s].data() + first * row, vs[s].data() + first * row, lens[s] - first);
      cuda::DeviceBuffer dk(lens[s] * row * 4), dv(lens[s] * row * 4);
      dk.upload(ks[s].data(), lens[s] * row * 4);
      dv.upload(vs[s].data(), lens[s] * row * 4);
      dlayer.append_device(s, dk.as<float>(), dv.as<float>(), lens[s]);
    }
    const std::vector<int> all = {0, 1, 2};
    cuda::DeviceBuffer bk(3 * row * 4), bv(3 * row * 4);
    for (int step = 0; step < steps; ++step) {
      for (int s = 0; s < 3; ++s) {
        const size_t at = size_t(lens[s] + step) * row;
        layer.append(s, ks[s].data() + at, vs[s].data() + at, 1);
      }
      upload_decode_step(ks, vs, lens, step, row, bk, bv);
      dlayer.append_batch_device(all.data(), 3, bk.as<float>(), bv.as<float>());
    }
    std::vector<int> totals;
    for (int s = 0; s < 3; ++s) totals.push_back(lens[s] + steps);
    expect_cache_layers(cache, totals, c.prefix, c.window, {&layer, &dlayer});
    for (int h = 0; h < H; ++h)
      for (const bool key : {true, false}) {
        EXPECT_EQ(dlayer.hi_channels(h, key), cache.outlier_channels(0, h, key)) << "head " << h << " key " << key;
        EXPECT_EQ(layer.hi_channels(h, key), cache.outlier_channels(0, h, key)) << "head " << h << " key " << key;
      }
    if (c.window == 0 && c.prefix == 0) {  // records carry no channels: an auto layer refuses them
      std::vector<uint8_t> rk(layer.k_record_bytes() * H), rv(layer.v_record_bytes() * H);
      layer.read_records(0, 0, 1, rk.data(), rv.data());
      const int n0 = dlayer.n_tokens(0);
      EXPECT_THROW(dlayer.append_records(0, rk.data(), rv.data(), 1), Error);
      EXPECT_EQ(dlayer.n_tokens(0), n0);
      cuda::GpuKvLayer given(cache.k_quantizer(0), cache.v_quantizer(0), cfg);  // channels given: accepted
      given.add_sequence();
      given.append_records(0, rk.data(), rv.data(), 1);
      EXPECT_EQ(given.n_tokens(0), 1);
    }
    worst = std::max(worst, expect_cache_attention(cache, 3, hq, test::random_gaussian(size_t(3) * hq * d, 61),
                                                   {&layer, &dlayer}, plain_sliding_capped(30, 2, 0.0f)));
    // A first compressing append refused for a NaN chooses no channels: the
    // next one chooses from its own tokens, as KvCache does.
    // (1e30 under round_to f32: every value finite, so the channels are
    // chosen, and then the squared norm overflows: the choice is undone.)
    for (const auto& [poison, rt] : {std::pair{std::numeric_limits<float>::quiet_NaN(), cuda::DType::f16},
                                     std::pair{1e30f, cuda::DType::f32}}) {
      if (c.window != 0 || c.prefix != 0) break;
      cuda::GpuKvLayerConfig pc = auto_cfg;
      pc.round_to = rt;
      cuda::GpuKvLayer fresh(cache.k_quantizer(0), cache.v_quantizer(0), pc);
      cuda::GpuKvLayer poisoned(cache.k_quantizer(0), cache.v_quantizer(0), pc);
      fresh.add_sequence();
      poisoned.add_sequence();
      std::vector<float> nan_k(ks[2].begin(), ks[2].begin() + 20 * row);
      nan_k[5 * row + 3] = poison;
      EXPECT_THROW(poisoned.append(0, nan_k.data(), vs[2].data(), 20), Error);
      poisoned.append(0, ks[1].data(), vs[1].data(), 30);
      fresh.append(0, ks[1].data(), vs[1].data(), 30);
      const size_t kb = fresh.k_record_bytes(), vb = fresh.v_record_bytes();
      std::vector<uint8_t> fk(30 * H * kb), fv(30 * H * vb), pk(fk.size()), pv(fv.size());
      fresh.read_records(0, 0, 30, fk.data(), fv.data());
      poisoned.read_records(0, 0, 30, pk.data(), pv.data());
      EXPECT_EQ(fk, pk) << "a refused first append left its channel choice behind";
      EXPECT_EQ(fv, pv);
    }
    // A NaN is refused and changes nothing.
    std::vector<float> bad(row, 0.5f);
    bad[3] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(layer.append(2, bad.data(), bad.data(), 1), Error);
    EXPECT_EQ(layer.n_tokens(2), lens[2] + steps);
  }
  std::printf("channel splits: worst normalised error vs KvCache %.3g\n", worst);
}

// A sliding-window layer (GpuKvLayerConfig::sliding_window) gives back the
// pages no later query can see: a pool far smaller than the sequences' full
// length suffices, and attention (tensor-core and reference kernels, windows
// up to W) and the records still held are bit-identical to a layer that keeps
// every page, through prefill, synchronous and asynchronous decode appends,
// with and without a dense window. What was freed is refused by name.
TEST(CudaWindow, SlidingWindowFreesPagesAndKeepsAttention) {
  TQ_SKIP_WITHOUT_GPU();
  const int H = 2, g = 4, hq = H * g, d = 128, P = 16, W = 50, n_seqs = 2;
  const std::vector<int> prompt = {300, 37};
  const int steps = 300, total = 300 + steps;
  for (const int dense_window : {0, 8}) {
    SCOPED_TRACE("dense window " + std::to_string(dense_window));
    auto kq = make_quantizer("tq-mse:b=4", d, 31), vq = make_quantizer("tq-mse:b=4", d, 32);
    cuda::GpuKvLayerConfig cfg;
    cfg.n_heads_kv = H;
    cfg.page_tokens = P;
    cfg.max_seqs = n_seqs;
    cfg.max_pages_per_seq = (total + P - 1) / P;
    cfg.dense_window = dense_window;
    cuda::GpuKvLayer full(*kq, *vq, cfg);
    cfg.sliding_window = W;
    // A prefill's pages plus, per sequence, the window, its pair rounding and
    // the open page: 26 pages against the 60 the sequences span.
    cfg.max_pages = (prompt[0] + P - 1) / P + 7;
    ASSERT_LT(cfg.max_pages, n_seqs * ((total + P - 1) / P) / 2);
    cuda::GpuKvLayer sliding(*kq, *vq, cfg);
    const size_t row = size_t(H) * d;
    const auto k = kv_data(size_t(n_seqs) * total * H, d, 33), v = kv_data(size_t(n_seqs) * total * H, d, 34);
    auto tok = [&](const std::vector<float>& x, int s, int t) { return x.data() + (size_t(s) * total + t) * row; };
    for (cuda::GpuKvLayer* l : {&full, &sliding})
      for (int s = 0; s < n_seqs; ++s) {
        ASSERT_EQ(l->add_sequence(), s);
        l->append(s, tok(k, s, 0), tok(v, s, 0), prompt[s]);
      }
    const std::vector<float> q = test::random_gaussian(size_t(n_seqs) * hq * d, 35);
    cuda::DeviceBuffer dq(q.size() * 4), bk(n_seqs * row * 4), bv(n_seqs * row * 4);
    dq.upload(q.data(), q.size() * 4);
    AttentionParams narrow, whole;
    narrow.window = 20;
    whole.window = W;
    auto same = [&](const std::string& when) {
      for (const AttentionParams& ap : {narrow, whole})
        for (const auto kern : {cuda::DecodeKernel::automatic, cuda::DecodeKernel::reference}) {
          SCOPED_TRACE(when + " window " + std::to_string(ap.window) +
                       (kern == cuda::DecodeKernel::reference ? " reference kernel" : ""));
          const AttnOut a = run_attend(sliding, dq, hq, ap, kern), b = run_attend(full, dq, hq, ap, kern);
          EXPECT_EQ(a.out, b.out);
          EXPECT_EQ(a.lse, b.lse);
        }
      for (int s = 0; s < n_seqs; ++s) {
        ASSERT_EQ(sliding.n_tokens(s), full.n_tokens(s));
        const int first = sliding.first_record(s), end = full.n_tokens(s) - std::min(dense_window, full.n_tokens(s));
        EXPECT_EQ(full.first_record(s), 0);
        EXPECT_LE(first, std::max(0, full.n_tokens(s) - W));  // every record a window of W can see is kept
        const int n = end - first;
        std::vector<uint8_t> ak(size_t(n) * H * sliding.k_record_bytes()), av(size_t(n) * H * sliding.v_record_bytes());
        std::vector<uint8_t> bk2(ak.size()), bv2(av.size());
        sliding.read_records(s, first, n, ak.data(), av.data());
        full.read_records(s, first, n, bk2.data(), bv2.data());
        EXPECT_EQ(ak, bk2) << when << ": K records of sequence " << s;
        EXPECT_EQ(av, bv2) << when << ": V records of sequence " << s;
        if (first > 0) {
          EXPECT_THROW(sliding.read_records(s, first - 1, 1, ak.data(), av.data()), Error);
          EXPECT_THROW(sliding.download_page(s, first / P - 1, ak.data()), Error);
        }
      }
    };
    same("after the prefill");
    const std::vector<int> all = {0, 1};
    std::vector<int> at = prompt;
    for (int step = 0; step < steps; ++step) {
      std::vector<float> kb(n_seqs * row), vb(n_seqs * row);
      for (int s = 0; s < n_seqs; ++s) {
        std::copy(tok(k, s, at[s]), tok(k, s, at[s]) + row, kb.begin() + s * row);
        std::copy(tok(v, s, at[s]), tok(v, s, at[s]) + row, vb.begin() + s * row);
        ++at[s];
      }
      bk.upload(kb.data(), kb.size() * 4);
      bv.upload(vb.data(), vb.size() * 4);
      full.append_batch_device(all.data(), n_seqs, bk.as<float>(), bv.as<float>());
      // Synchronous for the first half, then asynchronous, checked every 25 steps.
      if (step < steps / 2) {
        sliding.append_batch_device(all.data(), n_seqs, bk.as<float>(), bv.as<float>());
      } else {
        sliding.append_batch_device_async(all.data(), n_seqs, bk.as<float>(), bv.as<float>());
        if (step % 25 == 24) sliding.check_appends();
      }
      if (step == steps / 2 - 1) same("after the synchronous steps");
    }
    sliding.check_appends();
    same("after the asynchronous steps");
    EXPECT_GT(sliding.first_record(1), prompt[1]);  // the short prompt's pages went too
    // What the layer freed cannot be attended.
    const size_t nq = q.size();
    cuda::DeviceBuffer out(nq * 4), ws(sliding.workspace_bytes(hq));
    AttentionParams wide = whole, sinks = narrow, none;
    wide.window = W + 1;
    sinks.n_sinks = 1;
    for (const AttentionParams& ap : {wide, sinks, none})
      EXPECT_THROW(sliding.attend(dq.as<float>(), hq, ap, out.as<float>(), nullptr, ws.data(), ws.size()), Error);
  }
}

TEST(CudaAttention, RejectsBadShapes) {
  TQ_SKIP_WITHOUT_GPU();
  auto kq = make_quantizer("tq-mse:b=4", 128, 1), vq = make_quantizer("tq-mse:b=4", 128, 2);
  auto prod = make_quantizer("tq-prod:b=4", 128, 1);
  auto odd = make_quantizer("tq-mse:b=4", 96, 1);
  cuda::GpuKvLayerConfig cfg;
  cfg.n_heads_kv = 2;
  EXPECT_THROW((void)cuda::GpuKvLayer(*prod, *vq, cfg), Error);
  EXPECT_THROW((void)cuda::GpuKvLayer(*odd, *odd, cfg), Error);
  // Channel lists that do not fit the format name what is wrong.
  auto sq = make_quantizer("tq-mse:b=3,hi=12.5%,hb=6", 128, 1);  // 16 hi channels
  std::vector<int> ok16(16), dup16(16, 3);
  for (int i = 0; i < 16; ++i) ok16[i] = 100 + i;
  std::vector<int> far16 = ok16;
  far16[4] = 128;
  for (const auto& bad : {std::vector<std::vector<int>>{ok16},  // one head of two
                          std::vector<std::vector<int>>{ok16, std::vector<int>(15, 1)},
                          std::vector<std::vector<int>>{ok16, dup16}, std::vector<std::vector<int>>{ok16, far16}}) {
    cuda::GpuKvLayerConfig c = cfg;
    c.k_hi_channels = bad;
    EXPECT_THROW((void)cuda::GpuKvLayer(*sq, *vq, c), Error);
  }
  cuda::GpuKvLayerConfig not_split = cfg;
  not_split.v_hi_channels = {ok16, ok16};
  EXPECT_THROW((void)cuda::GpuKvLayer(*sq, *vq, not_split), Error) << "V tq-mse:b=4 has no split";
  {
    cuda::GpuKvLayerConfig c = cfg;
    c.k_hi_channels = {ok16, ok16};
    cuda::GpuKvLayer split_layer(*sq, *vq, c);
    EXPECT_EQ(split_layer.k_record_bytes(), sq->bytes_per_vector());
  }
  {  // a split whose hi channels the first append chooses cannot attend before it
    auto halves = make_quantizer("tq-mse:b=2.5", 128, 1);
    for (const bool k_split : {true, false}) {
      cuda::GpuKvLayer early(k_split ? *sq : *vq, k_split ? *vq : *halves, cfg);
      early.add_sequence();
      cuda::DeviceBuffer ews(early.workspace_bytes(4)), eq(4 * 128 * 4), eout(4 * 128 * 4);
      try {
        early.attend(eq.as<float>(), 4, {}, eout.as<float>(), nullptr, ews.data(), ews.size());
        ADD_FAILURE() << "attend before the hi channels are chosen did not throw";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("hi channels are not chosen"), std::string::npos) << e.what();
      }
    }
  }
  cuda::GpuKvLayer layer(*kq, *vq, cfg);
  layer.add_sequence();
  cuda::DeviceBuffer ws(layer.workspace_bytes(4));
  EXPECT_THROW(layer.attend(nullptr, 3, {}, nullptr, nullptr, ws.data(), ws.size()), Error);
  EXPECT_THROW(layer.attend(nullptr, 4, {}, nullptr, nullptr, ws.data(), 8), Error);
  for (const bool bad_q : {true, false}) {  // an element type that is none of f32, f16, bf16
    const auto bad = static_cast<cuda::DType>(7);
    try {
      layer.attend(ws.data(), bad_q ? bad : cuda::DType::bf16, 4, {}, ws.data(), bad_q ? cuda::DType::f32 : bad,
                   nullptr, ws.data(), ws.size());
      ADD_FAILURE() << "attend with an unknown element type did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad_q ? "q_dtype 7" : "out_dtype 7"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(layer.add_sequence(), Error);
}

}  // namespace
}  // namespace tq

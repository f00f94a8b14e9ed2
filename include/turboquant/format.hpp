// Storage formats: what one encoded vector looks like, defined once.
//
// A format is named by a spec string (the one configuration language of the
// project; to_string(parse_format(s)) == s for canonical strings):
//
//   tq-mse:b=B[,scale=norm|ls|matched][,sf=f16|f32][,rot=hadamard|haar][,cb=exact|gauss][,hi=N]
//   tq-prod:b=B[,m=M][,s=orth|gauss][,scale=..][,sf=..][,rot=..][,cb=..]
//   polar[:levels=L][,b1=B1][,b=B][,rot=..]
//   q8_0[:rot=none|hadamard|haar]   q4_0[:rot=..]   (llama.cpp-style 32-element blocks)
//   f32 | f16 | bf16                                 (dense)
//
// Each encoded vector is one record of bytes_per_vector(spec, dim) bytes:
//   tq-mse (integer b):  [codes: packed b-bit x dim][scale]
//   tq-mse (fractional): [record of the hi channels at ceil(b)][record of the
//                         lo channels at floor(b)], each an integer-b record
//   tq-prod (b >= 2):    [codes: (b-1)-bit x dim][QJL signs: 1-bit x m][scale][residual norm]
//   tq-prod (b == 1):    [QJL signs: 1-bit x m][residual norm]
//   polar:               [level-1 angles: b1-bit x dim/2][level-2 angles: b-bit x dim/4]...
//                        [radii: fp16 x dim/2^L]
//   q8_0:                dim/32 blocks of [fp16 scale d][32 x int8 q]           x = q d
//   q4_0:                dim/32 blocks of [fp16 scale d][16 bytes: element i in the
//                        low nibble of byte i, element i+16 in the high nibble] x = (q - 8) d
//   f32, f16, bf16:      the dim values, little-endian
// Codes are tight little-endian bitstreams (bitpack.hpp); scale and norms are
// fp16 (sf=f16, default) or f32, little-endian, unaligned.
//
//   tq::FormatSpec f = tq::parse_format("tq-mse:b=3");
//   size_t n = tq::bytes_per_vector(f, 128);   // 50 = 48 code bytes + fp16 scale
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "turboquant/bitpack.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/rotation.hpp"

namespace tq {

enum class Method : uint8_t { mse, prod, polar, q8_0, q4_0, f32, f16, bf16 };
enum class ScaleMode : uint8_t {
  norm,     // s = |x|
  ls,       // s = <R x, c> / |c|^2, the least-squares scale: same bytes, lower MSE
  matched,  // s = |x| / |c|: the reconstruction has exactly the input's norm
};
enum class ScaleType : uint8_t { f16, f32 };
enum class SketchKind : uint8_t {
  orth,   // QJL rows orthonormal (blocks of a Haar matrix): ~2.8x less variance
  gauss,  // i.i.d. N(0, 1) rows, as in the QJL paper
};

struct FormatSpec {
  Method method = Method::mse;
  double bits = 4;  // mse: 1..8, fractional -> channel split; prod: total bits 1..8
  ScaleMode scale = ScaleMode::norm;
  ScaleType scale_type = ScaleType::f16;
  RotationKind rotation = RotationKind::hadamard;  // parse_format sets the method's default
  CodebookLaw law = CodebookLaw::exact;
  int sketch_rows = 0;  // prod: m, 0 means m = dim
  SketchKind sketch = SketchKind::orth;
  int hi_channels = 0;  // fractional mse: channels at ceil(b); 0 = whatever makes exactly b bits
  double hi_percent = 0;  // hi=P%: the high channels as a share of dim (rounded), instead of a count
  // mse outlier split with an integer b: hi_channels channels (the outliers,
  // chosen per KV head by the cache) at hi_bits, the others at b. 0 = none.
  int hi_bits = 0;
  int polar_levels = 4;
  int polar_bits1 = 4;  // level-1 angle bits (uniform on the circle)
  int polar_bits = 2;   // bits of the angles of levels 2..L

  bool operator==(const FormatSpec&) const = default;
};

FormatSpec parse_format(std::string_view spec);  // throws tq::Error naming the bad token
std::string to_string(const FormatSpec& spec);
std::string to_string(Method m);
std::string to_string(ScaleMode m);
std::string to_string(CodebookLaw law);

// The rotation a method uses unless its spec says otherwise.
RotationKind default_rotation(Method m);
bool is_dense(Method m);  // f32, f16, bf16

// Throws tq::Error if the spec cannot encode vectors of this dimension.
void validate_format(const FormatSpec& spec, int dim);

// The channel split of a tq-mse format: fractional b (hi channels at
// ceil(b), the rest at floor(b)), or integer b with hi=N,hb=B (N outlier
// channels at B bits, the rest at b). Each group has its own rotation,
// codebook and scale.
struct ChannelSplit {
  int hi_channels, hi_bits;  // the high-precision (outlier) channels
  int lo_channels, lo_bits;  // the rest
};
ChannelSplit channel_split(const FormatSpec& spec, int dim);
bool is_split(const FormatSpec& spec);

// Bytes of one record, by component (what a cache reports and allocates).
struct RecordBytes {
  size_t codes = 0;   // quantization codes (polar: all angle codes)
  size_t sketch = 0;  // QJL sign bits
  size_t scales = 0;  // scales, residual norms, polar radii
  constexpr size_t total() const { return codes + sketch + scales; }
};
RecordBytes record_bytes(const FormatSpec& spec, int dim);
size_t bytes_per_vector(const FormatSpec& spec, int dim);
// Real storage cost per coordinate, scales included: 8 * bytes / dim.
double bits_per_coord(const FormatSpec& spec, int dim);

// The layout arithmetic, constexpr so sizes are checked at compile time.
constexpr size_t scale_bytes(ScaleType t) { return t == ScaleType::f16 ? 2 : 4; }
constexpr size_t mse_record_bytes(int dim, int bits, ScaleType st = ScaleType::f16) {
  return packed_bytes(dim, bits) + scale_bytes(st);
}
constexpr size_t prod_record_bytes(int dim, int bits, int m, ScaleType st = ScaleType::f16) {
  return bits == 1 ? packed_bytes(m, 1) + scale_bytes(st)
                   : packed_bytes(dim, bits - 1) + packed_bytes(m, 1) + 2 * scale_bytes(st);
}
constexpr size_t polar_record_bytes(int dim, int levels, int bits1, int bits) {
  size_t n = 0;
  for (int l = 1; l <= levels; ++l) n += packed_bytes(dim >> l, l == 1 ? bits1 : bits);
  return n + 2 * size_t(dim >> levels);
}

// Reference byte budgets (shared/REFERENCE.md section 3, head_dim 128).
static_assert(mse_record_bytes(128, 4) == 66);
static_assert(mse_record_bytes(128, 3) == 50);
static_assert(mse_record_bytes(64, 3) + mse_record_bytes(64, 2) == 44);  // 2.5 bits
static_assert(prod_record_bytes(128, 3, 128) == 52);  // 2-bit codes + 128 signs + 2 fp16
static_assert(polar_record_bytes(128, 4, 4, 2) == 62);  // 3.875 bits per coordinate

// llama.cpp-compatible 32-element blocks.
constexpr int kBlockElems = 32;
struct BlockQ8_0 {
  uint16_t d;       // fp16 scale
  int8_t q[32];
};
struct BlockQ4_0 {
  uint16_t d;       // fp16 scale
  uint8_t qs[16];   // element i: low nibble of qs[i]; element i + 16: high nibble
};
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_0) == 18);

}  // namespace tq

// Spec strings, validation and the byte accounting of every format.
#include <gtest/gtest.h>

#include "turboquant/error.hpp"
#include "turboquant/format.hpp"
#include "turboquant/quantizer.hpp"

namespace tq {
namespace {

std::string error_of(const std::string& spec) {
  try {
    parse_format(spec);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Format, CanonicalStringsRoundTrip) {
  for (const char* s :
       {"tq-mse:b=1", "tq-mse:b=3", "tq-mse:b=4", "tq-mse:b=8", "tq-mse:b=2.5", "tq-mse:b=3.5",
        "tq-mse:b=2.5,hi=32", "tq-mse:b=4,hi=8,hb=8", "tq-mse:b=4,hi=12.5%,hb=6", "tq-mse:b=2.5,hi=25%", "tq-mse:b=3,hi=16,hb=5,scale=ls", "tq-mse:b=3,scale=ls", "tq-mse:b=3,scale=matched,sf=f32",
        "tq-mse:b=4,rot=haar,cb=gauss", "tq-prod:b=3", "tq-prod:b=3,m=128", "tq-prod:b=2,m=256,s=gauss",
        "tq-prod:b=4,scale=ls,rot=haar", "polar", "polar:levels=3", "polar:levels=5,b1=3,b=3",
        "polar:rot=haar", "q8_0", "q4_0", "q8_0:rot=hadamard", "q4_0:rot=haar", "f32", "f16",
        "bf16"}) {
    SCOPED_TRACE(s);
    EXPECT_EQ(to_string(parse_format(s)), s);
  }
}

TEST(Format, ParseIsOrderInsensitiveAndToStringIsCanonical) {
  EXPECT_EQ(to_string(parse_format("tq-mse:scale=ls,b=3")), "tq-mse:b=3,scale=ls");
  EXPECT_EQ(to_string(parse_format("tq-mse:b=3,scale=norm")), "tq-mse:b=3");
  EXPECT_EQ(to_string(parse_format("polar:b=2,b1=4,levels=4")), "polar");
  FormatSpec f;
  f.method = Method::prod;
  f.bits = 3;
  f.sketch = SketchKind::gauss;
  EXPECT_EQ(parse_format(to_string(f)), f);
}

TEST(Format, ErrorsNameTheBadTokenAndListWhatIsValid) {
  EXPECT_NE(error_of("tq-foo:b=3").find("unknown method 'tq-foo'"), std::string::npos);
  EXPECT_NE(error_of("tq-foo:b=3").find("tq-mse, tq-prod, polar"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,zz=1").find("unknown key 'zz'"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,zz=1").find("valid: b, scale"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,scale=big").find("bad value 'big' for key 'scale'"),
            std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,scale=big").find("norm, ls, matched"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b3").find("malformed token 'b3'"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=x").find("value 'x' for key 'b' is not a number"), std::string::npos);
  EXPECT_NE(error_of("tq-mse").find("needs a bit width"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:").find("empty parameter list"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,b=4").find("given twice"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=0").find("1..8"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=9").find("1..8"), std::string::npos);
  EXPECT_NE(error_of("tq-prod:b=2.5").find("integer"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,hi=4").find("needs hb=B"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3.5,hi=8,hb=8").find("hb= needs an integer b"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=4,hb=8").find("hb= needs hi=N"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=4,hi=100%,hb=8").find("0 < P < 100"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=4,hi=8,hb=4").find("must exceed b=4"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=4,hi=8,hb=9").find("hb must be 1..8"), std::string::npos);
  EXPECT_NE(error_of("polar:b1=9").find("b1 must be 1..8"), std::string::npos);
  EXPECT_NE(error_of("polar:m=3").find("unknown key 'm' for polar"), std::string::npos);
  EXPECT_NE(error_of("").find("unknown method"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,").find("malformed token ''"), std::string::npos);
}

TEST(Format, BlockAndDenseFormats) {
  EXPECT_EQ(bytes_per_vector(parse_format("q8_0"), 128), 4u * 34);
  EXPECT_EQ(bytes_per_vector(parse_format("q4_0"), 128), 4u * 18);
  EXPECT_EQ(bytes_per_vector(parse_format("f16"), 128), 256u);
  EXPECT_EQ(bytes_per_vector(parse_format("bf16"), 128), 256u);
  EXPECT_EQ(bytes_per_vector(parse_format("f32"), 128), 512u);
  EXPECT_EQ(parse_format("q4_0").rotation, RotationKind::none);
  EXPECT_EQ(parse_format("tq-mse:b=3").rotation, RotationKind::hadamard);
  EXPECT_THROW(validate_format(parse_format("q8_0"), 48), Error);  // not a multiple of 32
  EXPECT_NE(error_of("f16:b=3").find("unknown key 'b' for f16"), std::string::npos);
  EXPECT_NE(error_of("tq-mse:b=3,rot=none").find("needs a random rotation"), std::string::npos);
}

TEST(Format, ValidationAgainstDim) {
  EXPECT_THROW(validate_format(parse_format("tq-mse:b=3"), 0), Error);
  EXPECT_THROW(validate_format(parse_format("tq-mse:b=3"), 7), Error);
  EXPECT_NO_THROW(validate_format(parse_format("tq-mse:b=3"), 8));
  EXPECT_THROW(validate_format(parse_format("polar"), 72), Error);  // 72 % 16 != 0
  EXPECT_NO_THROW(validate_format(parse_format("polar"), 80));
  // 2.3 bits at dim 128 would need 38.4 channels at 3 bits.
  EXPECT_THROW(validate_format(parse_format("tq-mse:b=2.3"), 128), Error);
  EXPECT_NO_THROW(validate_format(parse_format("tq-mse:b=2.25"), 128));
  EXPECT_THROW(validate_format(parse_format("tq-mse:b=2.5,hi=128"), 128), Error);
}

TEST(Format, ByteBudgetsOfReferenceSection3) {
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=4"), 128), 66u);
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=3"), 128), 50u);
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=2.5"), 128), 44u);
  // Outlier split: 8 channels at 8 bits (8 bytes) + 56 at 4 (28) + two fp16 scales.
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=4,hi=8,hb=8"), 64), 40u);
  EXPECT_THROW(validate_format(parse_format("tq-mse:b=4,hi=8,hb=8"), 12), Error);  // 4 low channels
  // hi as a share of dim: 16 of 128 channels at 6 bits (12 bytes) + 112 at 4 (56) + 2 scales.
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=4,hi=12.5%,hb=6"), 128), 72u);
  EXPECT_EQ(channel_split(parse_format("tq-mse:b=4,hi=12.5%,hb=6"), 256).hi_channels, 32);
  EXPECT_EQ(bytes_per_vector(parse_format("tq-mse:b=3"), 128) +
                bytes_per_vector(parse_format("tq-mse:b=4"), 128),
            116u);
  // The paper's split (32 channels at 3 bits + 96 at 2) is really 2.25 bits of codes.
  const RecordBytes paper = record_bytes(parse_format("tq-mse:b=2.5,hi=32"), 128);
  EXPECT_EQ(paper.codes, 12u + 24u);
  EXPECT_EQ(paper.scales, 4u);
}

TEST(Format, ProdStoresBMinusOneBitsPlusOneSketchBit) {
  // Seed defect: "prod" presets that stored b bits + QJL instead of (b-1) + 1.
  const RecordBytes r = record_bytes(parse_format("tq-prod:b=3"), 128);
  EXPECT_EQ(r.codes, 128u * 2 / 8);
  EXPECT_EQ(r.sketch, 128u / 8);
  EXPECT_EQ(r.scales, 4u);  // fp16 scale + fp16 residual norm
  const RecordBytes r1 = record_bytes(parse_format("tq-prod:b=1,m=64"), 128);
  EXPECT_EQ(r1.codes, 0u);
  EXPECT_EQ(r1.sketch, 8u);
  EXPECT_EQ(r1.scales, 2u);
}

TEST(Format, PolarCodesAreBitPacked) {
  // Seed defect: PolarQuant codes stored one byte each.
  const RecordBytes r = record_bytes(parse_format("polar"), 128);
  EXPECT_EQ(r.codes, (64u * 4 + 32 * 2 + 16 * 2 + 8 * 2) / 8);  // 46, not 120 bytes
  EXPECT_EQ(r.scales, 8u * 2);
  EXPECT_DOUBLE_EQ(bits_per_coord(parse_format("polar"), 128), 3.875);
}

TEST(Format, QuantizerRecordSizeEqualsTheFormatFunction) {
  for (const char* s : {"tq-mse:b=1", "tq-mse:b=3", "tq-mse:b=7", "tq-mse:b=2.5", "tq-mse:b=3.5,sf=f32",
                        "tq-prod:b=1", "tq-prod:b=3", "tq-prod:b=3,m=100", "polar", "polar:levels=2"})
    for (int dim : {16, 64, 80, 96, 128, 256}) {
      const FormatSpec f = parse_format(s);
      if (f.method == Method::polar && dim % (1 << f.polar_levels)) continue;
      if (is_split(f) && dim < 32) continue;
      SCOPED_TRACE(std::string(s) + " dim " + std::to_string(dim));
      auto q = make_quantizer(f, dim);
      EXPECT_EQ(q->bytes_per_vector(), bytes_per_vector(f, dim));
      EXPECT_EQ(record_bytes(f, dim).total(), bytes_per_vector(f, dim));
    }
}

}  // namespace
}  // namespace tq

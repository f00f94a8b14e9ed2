// Rotations: orthogonal, invertible, reproducible, and (for Hadamard) fast.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.hpp"
#include "turboquant/error.hpp"
#include "turboquant/rotation.hpp"

namespace tq {
namespace {

struct Case {
  RotationKind kind;
  int dim;
};

class RotationTest : public ::testing::TestWithParam<Case> {};

TEST_P(RotationTest, PreservesNormsAndInverts) {
  const auto [kind, dim] = GetParam();
  Rotation rot(kind, dim, 42);
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    const std::vector<float> x = test::random_gaussian(dim, seed);
    std::vector<float> y(dim), back(dim);
    rot.forward(x.data(), y.data());
    rot.inverse(y.data(), back.data());
    double nx = 0, ny = 0;
    for (int i = 0; i < dim; ++i) {
      nx += double(x[i]) * x[i];
      ny += double(y[i]) * y[i];
    }
    EXPECT_TRUE(test::close(std::sqrt(ny), std::sqrt(nx), 0, 1e-5)) << "seed " << seed;
    for (int i = 0; i < dim; ++i)
      ASSERT_TRUE(test::close(back[i], x[i], 1e-5, 1e-5)) << "seed " << seed << " i " << i;
    // In place gives the same as out of place.
    std::vector<float> z = x;
    rot.forward(z.data(), z.data());
    EXPECT_EQ(z, y);
  }
}

TEST_P(RotationTest, MatrixIsOrthogonal) {
  const auto [kind, dim] = GetParam();
  const std::vector<double> m = Rotation(kind, dim, 3).matrix();
  double worst = 0;
  // All row pairs up to dim 256; above that every 7th row against all rows.
  const int step = dim > 256 ? 7 : 1;
  for (int i = 0; i < dim; i += step)
    for (int j = 0; j < dim; ++j) {
      double d = 0;
      for (int k = 0; k < dim; ++k) d += m[size_t(i) * dim + k] * m[size_t(j) * dim + k];
      worst = std::max(worst, std::fabs(d - (i == j ? 1.0 : 0.0)));
    }
  EXPECT_LT(worst, 1e-5);
}

TEST_P(RotationTest, ReproducibleFromKindDimSeedAndSeedMatters) {
  const auto [kind, dim] = GetParam();
  const std::vector<float> x = test::random_gaussian(dim, 9);
  std::vector<float> a(dim), b(dim), c(dim);
  Rotation(kind, dim, 5).forward(x.data(), a.data());
  Rotation(kind, dim, 5).forward(x.data(), b.data());
  Rotation(kind, dim, 6).forward(x.data(), c.data());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

INSTANTIATE_TEST_SUITE_P(
    All, RotationTest,
    ::testing::Values(Case{RotationKind::hadamard, 8}, Case{RotationKind::hadamard, 64},
                      Case{RotationKind::hadamard, 128}, Case{RotationKind::hadamard, 256},
                      Case{RotationKind::hadamard, 1024}, Case{RotationKind::hadamard, 80},
                      Case{RotationKind::hadamard, 96}, Case{RotationKind::hadamard, 192},
                      Case{RotationKind::hadamard, 97}, Case{RotationKind::haar, 8},
                      Case{RotationKind::haar, 64}, Case{RotationKind::haar, 96},
                      Case{RotationKind::haar, 128}, Case{RotationKind::haar, 129}),
    [](const auto& info) {
      return to_string(info.param.kind) + "_" + std::to_string(info.param.dim);
    });

TEST(Rotation, HadamardOfPowerOfTwoIsSignsThenTransform) {
  const Rotation rot(RotationKind::hadamard, 128, 1);
  ASSERT_EQ(rot.stages().size(), 2u);
  EXPECT_EQ(rot.stages()[0].op, RotationStage::Op::signs);
  EXPECT_EQ(rot.stages()[1].op, RotationStage::Op::hadamard_blocks);
  // Every matrix entry is +-1/sqrt(d).
  const std::vector<double> m = rot.matrix();
  for (double v : m) EXPECT_NEAR(std::fabs(v), 1.0 / std::sqrt(128.0), 1e-7);
}

TEST(Rotation, NonPowerOfTwoMixesAcrossBlocks) {
  EXPECT_EQ(hadamard_blocks(96), (std::vector<int>{64, 32}));
  EXPECT_EQ(hadamard_blocks(80), (std::vector<int>{64, 16}));
  EXPECT_EQ(hadamard_blocks(192), (std::vector<int>{128, 64}));
  // A unit vector on one coordinate of the small block spreads into the large one.
  const Rotation rot(RotationKind::hadamard, 96, 1);
  std::vector<float> e(96, 0.0f), y(96);
  e[90] = 1.0f;
  rot.forward(e.data(), y.data());
  double big = 0;
  for (int i = 0; i < 64; ++i) big += double(y[i]) * y[i];
  EXPECT_GT(big, 0.2);
  EXPECT_LT(big, 0.9);
}

TEST(Rotation, HaarMatrixIsHaarLike) {
  // E[M_ij^2] = 1/d; check the sample second moment over one 128 x 128 matrix.
  const std::vector<double> m = haar_orthogonal(128, 11);
  double s2 = 0;
  for (double v : m) s2 += v * v;
  EXPECT_NEAR(s2 / m.size(), 1.0 / 128, 1e-12);  // exact: rows are unit
  // Diagonal is not biased positive (the QR sign correction): mean ~ 0.
  double diag = 0;
  for (int i = 0; i < 128; ++i) diag += m[size_t(i) * 128 + i];
  EXPECT_LT(std::fabs(diag / 128), 4.0 / std::sqrt(128.0 * 128));
}

TEST(Rotation, BadDimThrows) {
  EXPECT_THROW(Rotation(RotationKind::hadamard, 0, 1), Error);
  EXPECT_THROW(Rotation(RotationKind::haar, -3, 1), Error);
}

}  // namespace
}  // namespace tq

// Random orthogonal rotations, reproducible from (kind, dim, seed).
//
//  - hadamard, dim a power of two: R = H D / sqrt(dim): seeded +-1 signs D,
//    then a normalised fast Walsh-Hadamard transform, O(d log d).
//  - hadamard, other dims (80, 96, 192, ...): block-diagonal. dim is split
//    into power-of-two blocks (largest first, 96 = 64 + 32), and two rounds
//    of (signs, block Hadamard) are joined by a seeded permutation so that
//    energy also mixes across blocks: R = B D2 P B D1. Still O(d log d).
//  - haar, any dim: Q from the QR of a seeded Gaussian matrix, with the
//    signs of R's diagonal folded in, so Q is exactly Haar distributed.
//  - none: the identity (for the dense and llama.cpp-style block formats).
// The same object rotates on every SIMD level with bit-identical results.
//
//   tq::Rotation rot(tq::RotationKind::hadamard, 128, /*seed=*/7);
//   rot.forward(x, y);  rot.inverse(y, x_back);   // x_back == x to ~1e-7
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "turboquant/simd.hpp"

namespace tq {

enum class RotationKind { hadamard, haar, none };  // none: identity (block/dense formats)
std::string to_string(RotationKind kind);

// One step of a rotation; a rotation is a short list of these.
struct RotationStage {
  enum class Op { signs, hadamard_blocks, permute, dense };
  Op op;
  std::vector<float> signs;   // signs: +-1 per coordinate
  std::vector<int> blocks;    // hadamard_blocks: power-of-two sizes summing to dim
  std::vector<int> perm;      // permute: y[i] = x[perm[i]]
  std::vector<float> cols;    // dense: M column by column, cols[j * dim + i] = M_ij
  std::vector<float> cols_t;  // dense: M^T column by column (for the inverse)
};

class Rotation {
 public:
  Rotation(RotationKind kind, int dim, uint64_t seed);
  Rotation(RotationKind kind, int dim, uint64_t seed, SimdLevel level);

  RotationKind kind() const { return kind_; }
  int dim() const { return dim_; }
  uint64_t seed() const { return seed_; }
  const std::vector<RotationStage>& stages() const { return stages_; }

  // y = R x and x = R^T y. x, y: [dim]; in place (x == y) is allowed.
  void forward(const float* x, float* y) const;
  void inverse(const float* y, float* x) const;

  // The matrix, row-major [dim, dim], in double (tests, small dims).
  std::vector<double> matrix() const;

 private:
  void run(const RotationStage& s, bool inverse, float* x) const;

  RotationKind kind_;
  int dim_;
  uint64_t seed_;
  const void* kernels_;  // kernels::Kernels, chosen at construction
  std::vector<RotationStage> stages_;
};

// A Haar-random orthogonal matrix [dim, dim], row-major, from a seed
// (Householder QR of a Gaussian matrix in double, with sign correction).
std::vector<double> haar_orthogonal(int dim, uint64_t seed);

// Power-of-two block sizes for the block-diagonal Hadamard, largest first.
std::vector<int> hadamard_blocks(int dim);

}  // namespace tq

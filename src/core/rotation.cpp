#include "turboquant/rotation.hpp"

#include <cmath>
#include <cstring>

#include "kernels/kernels.hpp"
#include "turboquant/error.hpp"
#include "turboquant/rng.hpp"

namespace tq {
namespace {

bool is_pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }

const kernels::Kernels& K(const void* p) { return *static_cast<const kernels::Kernels*>(p); }

RotationStage make_signs(int dim, uint64_t seed) {
  RotationStage s{RotationStage::Op::signs, {}, {}, {}, {}, {}};
  Rng rng(seed);
  s.signs.resize(dim);
  uint64_t bits = 0;
  for (int i = 0; i < dim; ++i) {
    if (i % 64 == 0) bits = rng.next_u64();
    s.signs[i] = (bits >> (i % 64)) & 1 ? -1.0f : 1.0f;
  }
  return s;
}

RotationStage make_blocks(int dim) {
  RotationStage s{RotationStage::Op::hadamard_blocks, {}, hadamard_blocks(dim), {}, {}, {}};
  return s;
}

RotationStage make_perm(int dim, uint64_t seed) {
  RotationStage s{RotationStage::Op::permute, {}, {}, {}, {}, {}};
  s.perm.resize(dim);
  for (int i = 0; i < dim; ++i) s.perm[i] = i;
  Rng rng(seed);
  for (int i = dim - 1; i > 0; --i) std::swap(s.perm[i], s.perm[rng.below(i + 1)]);
  return s;
}

// Scratch for the permutation stage, reused per thread: run() never allocates
// once warm.
float* scratch(int dim) {
  thread_local std::vector<float> buf;
  if (static_cast<int>(buf.size()) < dim) buf.resize(dim);
  return buf.data();
}

}  // namespace

std::string to_string(RotationKind kind) {
  switch (kind) {
    case RotationKind::hadamard: return "hadamard";
    case RotationKind::haar: return "haar";
    case RotationKind::none: return "none";
  }
  return "?";
}

std::vector<int> hadamard_blocks(int dim) {
  std::vector<int> blocks;
  for (int b = 1 << 30; b >= 1; b >>= 1)
    if (dim & b) blocks.push_back(b);
  return blocks;
}

std::vector<double> haar_orthogonal(int dim, uint64_t seed) {
  TQ_REQUIRE(dim >= 1 && dim <= 16384, "haar rotation: dim must be 1..16384, got ", dim);
  const size_t n = dim;
  // a: column-major Gaussian matrix; Householder QR in place.
  std::vector<double> a(n * n);
  Rng rng(seed);
  for (auto& v : a) v = rng.gaussian();
  auto A = [&](size_t i, size_t j) -> double& { return a[j * n + i]; };
  std::vector<double> tau(n, 0.0), rdiag(n, 0.0);
  for (size_t k = 0; k < n; ++k) {
    double norm = 0;
    for (size_t i = k; i < n; ++i) norm += A(i, k) * A(i, k);
    norm = std::sqrt(norm);
    const double alpha = A(k, k) > 0 ? -norm : norm;  // R_kk
    rdiag[k] = alpha;
    // v = x - alpha e1, stored in column k below the diagonal (v_k explicit).
    A(k, k) -= alpha;
    double vnorm2 = 0;
    for (size_t i = k; i < n; ++i) vnorm2 += A(i, k) * A(i, k);
    tau[k] = vnorm2 > 0 ? 2.0 / vnorm2 : 0.0;
    for (size_t j = k + 1; j < n; ++j) {
      double d = 0;
      for (size_t i = k; i < n; ++i) d += A(i, k) * A(i, j);
      d *= tau[k];
      for (size_t i = k; i < n; ++i) A(i, j) -= d * A(i, k);
    }
  }
  // Q = H_0 H_1 ... H_{n-1}; apply to the identity from the right-most.
  std::vector<double> q(n * n, 0.0);  // column-major
  for (size_t i = 0; i < n; ++i) q[i * n + i] = 1.0;
  for (size_t kk = n; kk-- > 0;) {
    for (size_t j = 0; j < n; ++j) {
      double d = 0;
      for (size_t i = kk; i < n; ++i) d += A(i, kk) * q[j * n + i];
      d *= tau[kk];
      for (size_t i = kk; i < n; ++i) q[j * n + i] -= d * A(i, kk);
    }
  }
  // Haar: multiply column j by sign(R_jj) (Mezzadri 2007).
  std::vector<double> out(n * n);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) out[i * n + j] = q[j * n + i] * (rdiag[j] < 0 ? -1.0 : 1.0);
  return out;
}

Rotation::Rotation(RotationKind kind, int dim, uint64_t seed)
    : Rotation(kind, dim, seed, simd_level()) {}

Rotation::Rotation(RotationKind kind, int dim, uint64_t seed, SimdLevel level)
    : kind_(kind), dim_(dim), seed_(seed), kernels_(&kernels::kernels_for(level)) {
  TQ_REQUIRE(dim >= 1 && dim <= 16384, "rotation dim must be 1..16384, got ", dim);
  if (kind == RotationKind::none) {
    // identity: no stages
  } else if (kind == RotationKind::haar) {
    const std::vector<double> m = haar_orthogonal(dim, derive_seed(seed, "haar"));
    RotationStage s{RotationStage::Op::dense, {}, {}, {}, {}, {}};
    s.cols.resize(size_t(dim) * dim);
    s.cols_t.resize(size_t(dim) * dim);
    for (int i = 0; i < dim; ++i)
      for (int j = 0; j < dim; ++j) {
        s.cols[size_t(j) * dim + i] = static_cast<float>(m[size_t(i) * dim + j]);
        s.cols_t[size_t(i) * dim + j] = static_cast<float>(m[size_t(i) * dim + j]);
      }
    stages_.push_back(std::move(s));
  } else if (is_pow2(dim)) {
    stages_.push_back(make_signs(dim, derive_seed(seed, "signs1")));
    stages_.push_back(make_blocks(dim));
  } else {
    stages_.push_back(make_signs(dim, derive_seed(seed, "signs1")));
    stages_.push_back(make_blocks(dim));
    stages_.push_back(make_perm(dim, derive_seed(seed, "perm")));
    stages_.push_back(make_signs(dim, derive_seed(seed, "signs2")));
    stages_.push_back(make_blocks(dim));
  }
}

void Rotation::run(const RotationStage& s, bool inverse, float* x) const {
  const auto& k = K(kernels_);
  switch (s.op) {
    case RotationStage::Op::signs:
      k.mul_signs(x, s.signs.data(), dim_);
      break;
    case RotationStage::Op::hadamard_blocks: {
      int off = 0;
      for (int b : s.blocks) {
        k.fwht(x + off, b, 1.0f / std::sqrt(static_cast<float>(b)));
        off += b;
      }
      break;
    }
    case RotationStage::Op::permute: {
      float* t = scratch(dim_);
      std::memcpy(t, x, sizeof(float) * dim_);
      if (inverse)
        for (int i = 0; i < dim_; ++i) x[s.perm[i]] = t[i];
      else
        for (int i = 0; i < dim_; ++i) x[i] = t[s.perm[i]];
      break;
    }
    case RotationStage::Op::dense: {
      float* t = scratch(dim_);
      std::memcpy(t, x, sizeof(float) * dim_);
      k.matvec(inverse ? s.cols_t.data() : s.cols.data(), t, x, dim_, dim_);
      break;
    }
  }
}

void Rotation::forward(const float* x, float* y) const {
  if (y != x) std::memcpy(y, x, sizeof(float) * dim_);
  for (const auto& s : stages_) run(s, false, y);
}

void Rotation::inverse(const float* y, float* x) const {
  if (x != y) std::memcpy(x, y, sizeof(float) * dim_);
  for (auto it = stages_.rbegin(); it != stages_.rend(); ++it) run(*it, true, x);
}

std::vector<double> Rotation::matrix() const {
  std::vector<double> m(size_t(dim_) * dim_);
  std::vector<float> e(dim_);
  for (int j = 0; j < dim_; ++j) {
    std::fill(e.begin(), e.end(), 0.0f);
    e[j] = 1.0f;
    forward(e.data(), e.data());
    for (int i = 0; i < dim_; ++i) m[size_t(i) * dim_ + j] = e[i];
  }
  return m;
}

}  // namespace tq

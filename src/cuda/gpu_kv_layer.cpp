// Host side of the GPU KV layer (include/turboquant/cuda.hpp): device page
// pool, page tables and the launches. Compiled by the C++ compiler against
// the CUDA runtime; the kernels live in the .cu files beside it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/kernels.hpp"
#include "quant/quantizers.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/cuda.hpp"

namespace tq::cuda {

bool cuda_available() { return cuda_device_count() > 0; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error for the caller
    return 0;
  }
  return n;
}

std::string cuda_device_name(int device) {
  TQ_REQUIRE(device >= 0 && device < cuda_device_count(), "CUDA device ", device,
             " does not exist (", cuda_device_count(), " devices)");
  cudaDeviceProp prop{};
  TQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

// ---- DeviceBuffer ------------------------------------------------------------
DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes > 0) TQ_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}
DeviceBuffer::~DeviceBuffer() {
  if (ptr_) (void)cudaFree(ptr_);  // no throwing from a destructor
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
  o.ptr_ = nullptr;
  o.bytes_ = 0;
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) (void)cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}
void DeviceBuffer::upload(const void* host, size_t bytes) {
  TQ_REQUIRE(bytes <= bytes_, "DeviceBuffer::upload: ", bytes, " bytes into a buffer of ", bytes_);
  if (bytes) TQ_CUDA_CHECK(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice));
}
void DeviceBuffer::download(void* host, size_t bytes) const {
  TQ_REQUIRE(bytes <= bytes_, "DeviceBuffer::download: ", bytes, " bytes from a buffer of ", bytes_);
  if (bytes) TQ_CUDA_CHECK(cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost));
}

// ---- GpuKvLayer ----------------------------------------------------------------
namespace {

// Host copy of what a format needs on the device, validated.
struct HostFormat {
  int dim, bits;
  std::vector<float> signs, boundaries, centroids;
  float post_scale;
  int code_bytes, scale_f32, record_bytes;
};

HostFormat host_format(const Quantizer& q, const char* which) {
  const FormatSpec& s = q.spec();
  const auto* mq = dynamic_cast<const quant::MseQuantizer*>(&q);
  const int d = q.dim();
  TQ_REQUIRE(mq != nullptr && s.method == Method::mse && s.bits == std::floor(s.bits),
             "GPU KV layer: ", which, " format ", to_string(s),
             " is not supported (expected tq-mse with an integer bit width)");
  TQ_REQUIRE(s.scale == ScaleMode::norm, "GPU KV layer: ", which, " format ", to_string(s),
             ": only scale=norm is supported on the GPU");
  TQ_REQUIRE(s.rotation == RotationKind::hadamard, "GPU KV layer: ", which, " format ",
             to_string(s), ": only rot=hadamard is supported on the GPU");
  TQ_REQUIRE(d == 64 || d == 128 || d == 256, "GPU KV layer: head_dim ", d,
             " is not supported (expected 64, 128 or 256)");
  const auto& st = mq->rotation().stages();
  TQ_ASSERT(st.size() == 2 && st[0].op == RotationStage::Op::signs &&
            st[1].op == RotationStage::Op::hadamard_blocks && st[1].blocks.size() == 1);
  HostFormat f;
  f.dim = d;
  f.bits = static_cast<int>(s.bits);
  f.signs = st[0].signs;
  const Codebook& cb = sphere_codebook(s.law, d, f.bits);
  f.boundaries = cb.boundaries;
  f.centroids = cb.centroids;
  f.post_scale = 1.0f / std::sqrt(static_cast<float>(d));  // as Rotation::run computes it
  f.code_bytes = static_cast<int>(packed_bytes(d, f.bits));
  f.scale_f32 = s.scale_type == ScaleType::f32;
  f.record_bytes = static_cast<int>(q.bytes_per_vector());
  TQ_ASSERT(size_t(f.record_bytes) == f.code_bytes + scale_bytes(s.scale_type));
  return f;
}

}  // namespace

struct GpuKvLayer::Impl {
  GpuKvLayerConfig cfg;
  HostFormat hk, hv;
  MseDeviceFormat kf, vf;
  size_t page_bytes = 0;
  int n_splits = 0;
  DeviceBuffer consts, pool, page_table, lengths, status;
  DeviceBuffer staging, dst;  // append scratch, grown on demand
  std::vector<std::vector<int>> pages;  // per sequence
  std::vector<int> len;                 // per sequence
  std::vector<int> free_pages;          // stack

  void check_seq(int seq) const {
    TQ_REQUIRE(seq >= 0 && seq < static_cast<int>(len.size()), "GPU KV layer: sequence ", seq,
               " does not exist (", len.size(), " sequences)");
  }
  PagedRegion region(bool v) {
    PagedRegion r;
    r.pool = pool.as<uint8_t>();
    r.page_bytes = page_bytes;
    r.region_offset = v ? size_t(cfg.page_tokens) * cfg.n_heads_kv * hk.record_bytes : 0;
    r.page_tokens = cfg.page_tokens;
    r.n_heads = cfg.n_heads_kv;
    return r;
  }
  void ensure(DeviceBuffer& b, size_t bytes) {
    if (b.size() < bytes) b = DeviceBuffer(std::max(bytes, 2 * b.size()));
  }

  // Appends tokens given as (sequence, count) runs; rows of k, v in that order.
  void append_runs(const std::vector<std::pair<int, int>>& runs, const float* k, const float* v,
                   cudaStream_t stream) {
    const int P = cfg.page_tokens;
    int total = 0;
    size_t need_new = 0;
    for (auto [s, n] : runs) {
      check_seq(s);
      TQ_REQUIRE(n >= 0, "GPU KV layer: append of ", n, " tokens");
      const int need = (len[s] + n + P - 1) / P;
      TQ_REQUIRE(need <= cfg.max_pages_per_seq, "GPU KV layer: sequence ", s, " would hold ",
                 len[s] + n, " tokens, over its capacity of ", cfg.max_pages_per_seq * P,
                 " (max_pages_per_seq * page_tokens)");
      need_new += need - pages[s].size();
      total += n;
    }
    if (total == 0) return;
    TQ_REQUIRE(need_new <= free_pages.size(), "GPU KV layer: page pool exhausted (", need_new,
               " pages needed, ", free_pages.size(), " free)");
    std::vector<std::pair<int, size_t>> added;  // (seq, old page count) for the rollback
    std::vector<int> d(2 * size_t(total));
    int row = 0;
    for (auto [s, n] : runs) {
      added.emplace_back(s, pages[s].size());
      for (int t = len[s]; t < len[s] + n; ++t, ++row) {
        if (t / P >= static_cast<int>(pages[s].size())) {
          pages[s].push_back(free_pages.back());
          free_pages.pop_back();
        }
        d[2 * row] = pages[s][t / P];
        d[2 * row + 1] = t % P;
      }
    }
    try {
      ensure(dst, d.size() * sizeof(int));
      TQ_CUDA_CHECK(cudaMemcpyAsync(dst.data(), d.data(), d.size() * sizeof(int),
                                    cudaMemcpyHostToDevice, stream));
      for (auto [s, old] : added)
        if (pages[s].size() > old)
          TQ_CUDA_CHECK(cudaMemcpyAsync(page_table.as<int>() + size_t(s) * cfg.max_pages_per_seq,
                                        pages[s].data(), pages[s].size() * sizeof(int),
                                        cudaMemcpyHostToDevice, stream));
      TQ_CUDA_CHECK(cudaMemsetAsync(status.data(), 0, sizeof(int), stream));
      launch_mse_append(k, total, dst.as<int>(), kf, region(false), status.as<int>(), stream);
      launch_mse_append(v, total, dst.as<int>(), vf, region(true), status.as<int>(), stream);
      int st = 0;
      TQ_CUDA_CHECK(cudaMemcpyAsync(&st, status.data(), sizeof(int), cudaMemcpyDeviceToHost, stream));
      TQ_CUDA_CHECK(cudaStreamSynchronize(stream));
      TQ_REQUIRE(!(st & kStatusNonFinite),
                 "GPU KV layer: append refused: a key or value has a NaN/Inf component or "
                 "its squared norm overflows float");
      TQ_REQUIRE(!(st & kStatusScaleOverflow),
                 "GPU KV layer: append refused: a scale does not fit fp16 (max 65504); use a "
                 "format with sf=f32");
      std::vector<int> new_len = len;
      for (auto [s, n] : runs) new_len[s] += n;
      TQ_CUDA_CHECK(cudaMemcpyAsync(lengths.data(), new_len.data(), new_len.size() * sizeof(int),
                                    cudaMemcpyHostToDevice, stream));
      TQ_CUDA_CHECK(cudaStreamSynchronize(stream));
      len = std::move(new_len);
    } catch (...) {  // the sequences are left as they were
      for (auto it = added.rbegin(); it != added.rend(); ++it)
        while (pages[it->first].size() > it->second) {
          free_pages.push_back(pages[it->first].back());
          pages[it->first].pop_back();
        }
      throw;
    }
  }
};

GpuKvLayer::GpuKvLayer(const Quantizer& kq, const Quantizer& vq, const GpuKvLayerConfig& cfg)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  TQ_REQUIRE(cuda_available(), "GPU KV layer: no CUDA device");
  TQ_REQUIRE(cfg.n_heads_kv >= 1, "GPU KV layer: n_heads_kv must be >= 1, got ", cfg.n_heads_kv);
  TQ_REQUIRE(cfg.page_tokens >= 1, "GPU KV layer: page_tokens must be >= 1, got ", cfg.page_tokens);
  TQ_REQUIRE(cfg.max_seqs >= 1, "GPU KV layer: max_seqs must be >= 1, got ", cfg.max_seqs);
  TQ_REQUIRE(cfg.max_pages_per_seq >= 1, "GPU KV layer: max_pages_per_seq must be >= 1, got ",
             cfg.max_pages_per_seq);
  TQ_REQUIRE(cfg.split_pages >= 1, "GPU KV layer: split_pages must be >= 1, got ", cfg.split_pages);
  TQ_REQUIRE(kq.dim() == vq.dim(), "GPU KV layer: K dim ", kq.dim(), " != V dim ", vq.dim());
  if (m.cfg.max_pages <= 0) m.cfg.max_pages = cfg.max_seqs * cfg.max_pages_per_seq;
  m.hk = host_format(kq, "K");
  m.hv = host_format(vq, "V");
  m.page_bytes = size_t(cfg.page_tokens) * cfg.n_heads_kv * (m.hk.record_bytes + m.hv.record_bytes);
  m.n_splits = (cfg.max_pages_per_seq + cfg.split_pages - 1) / cfg.split_pages;

  // Constants: [k signs | k boundaries | k centroids | v ...] in one buffer.
  std::vector<float> c;
  std::vector<size_t> off;
  for (const HostFormat* f : {&m.hk, &m.hv})
    for (const std::vector<float>* a : {&f->signs, &f->boundaries, &f->centroids}) {
      off.push_back(c.size());
      c.insert(c.end(), a->begin(), a->end());
    }
  m.consts = DeviceBuffer(c.size() * sizeof(float));
  m.consts.upload(c.data(), c.size() * sizeof(float));
  auto fill = [&](const HostFormat& h, MseDeviceFormat& f, const size_t* o) {
    f.dim = h.dim;
    f.bits = h.bits;
    f.signs = m.consts.as<float>() + o[0];
    f.boundaries = m.consts.as<float>() + o[1];
    f.centroids = m.consts.as<float>() + o[2];
    f.post_scale = h.post_scale;
    f.code_bytes = h.code_bytes;
    f.scale_f32 = h.scale_f32;
    f.record_bytes = h.record_bytes;
  };
  fill(m.hk, m.kf, off.data());
  fill(m.hv, m.vf, off.data() + 3);

  m.pool = DeviceBuffer(size_t(m.cfg.max_pages) * m.page_bytes);
  m.page_table = DeviceBuffer(size_t(cfg.max_seqs) * cfg.max_pages_per_seq * sizeof(int));
  TQ_CUDA_CHECK(cudaMemset(m.page_table.data(), 0, m.page_table.size()));
  m.lengths = DeviceBuffer(size_t(cfg.max_seqs) * sizeof(int));
  TQ_CUDA_CHECK(cudaMemset(m.lengths.data(), 0, m.lengths.size()));
  m.status = DeviceBuffer(sizeof(int));
  for (int p = m.cfg.max_pages - 1; p >= 0; --p) m.free_pages.push_back(p);
}

GpuKvLayer::~GpuKvLayer() = default;

const GpuKvLayerConfig& GpuKvLayer::config() const { return impl_->cfg; }
int GpuKvLayer::head_dim() const { return impl_->hk.dim; }
size_t GpuKvLayer::k_record_bytes() const { return impl_->hk.record_bytes; }
size_t GpuKvLayer::v_record_bytes() const { return impl_->hv.record_bytes; }
size_t GpuKvLayer::page_bytes() const { return impl_->page_bytes; }
int GpuKvLayer::n_seqs() const { return static_cast<int>(impl_->len.size()); }

int GpuKvLayer::add_sequence() {
  Impl& m = *impl_;
  TQ_REQUIRE(static_cast<int>(m.len.size()) < m.cfg.max_seqs, "GPU KV layer: already holds max_seqs = ",
             m.cfg.max_seqs, " sequences");
  m.len.push_back(0);
  m.pages.emplace_back();
  return static_cast<int>(m.len.size()) - 1;
}

int GpuKvLayer::n_tokens(int seq) const {
  impl_->check_seq(seq);
  return impl_->len[seq];
}
int GpuKvLayer::n_pages(int seq) const {
  impl_->check_seq(seq);
  return static_cast<int>(impl_->pages[seq].size());
}

void GpuKvLayer::append(int seq, const float* k, const float* v, int n_tokens) {
  Impl& m = *impl_;
  m.check_seq(seq);
  TQ_REQUIRE(n_tokens >= 0, "GPU KV layer: append of ", n_tokens, " tokens");
  const size_t n = size_t(n_tokens) * m.cfg.n_heads_kv * m.hk.dim;
  m.ensure(m.staging, 2 * n * sizeof(float));
  float* sk = m.staging.as<float>();
  if (n) {
    TQ_CUDA_CHECK(cudaMemcpy(sk, k, n * sizeof(float), cudaMemcpyHostToDevice));
    TQ_CUDA_CHECK(cudaMemcpy(sk + n, v, n * sizeof(float), cudaMemcpyHostToDevice));
  }
  m.append_runs({{seq, n_tokens}}, sk, sk + n, nullptr);
}

void GpuKvLayer::append_device(int seq, const float* k, const float* v, int n_tokens,
                               Stream stream) {
  impl_->append_runs({{seq, n_tokens}}, k, v, stream);
}

void GpuKvLayer::append_batch_device(const int* seqs, int n, const float* k, const float* v,
                                     Stream stream) {
  TQ_REQUIRE(n >= 0, "GPU KV layer: batch of ", n, " sequences");
  std::vector<std::pair<int, int>> runs;
  std::vector<char> seen(impl_->len.size(), 0);
  for (int i = 0; i < n; ++i) {
    impl_->check_seq(seqs[i]);
    TQ_REQUIRE(!seen[seqs[i]], "GPU KV layer: sequence ", seqs[i], " appears twice in a batch");
    seen[seqs[i]] = 1;
    runs.emplace_back(seqs[i], 1);
  }
  impl_->append_runs(runs, k, v, stream);
}

void GpuKvLayer::download_page(int seq, int page, uint8_t* out) const {
  const Impl& m = *impl_;
  m.check_seq(seq);
  TQ_REQUIRE(page >= 0 && page < static_cast<int>(m.pages[seq].size()), "GPU KV layer: page ",
             page, " of sequence ", seq, " does not exist (", m.pages[seq].size(), " pages)");
  TQ_CUDA_CHECK(cudaMemcpy(out, m.pool.as<uint8_t>() + size_t(m.pages[seq][page]) * m.page_bytes,
                           m.page_bytes, cudaMemcpyDeviceToHost));
}

// The attention parameters of this layer for n_heads_q query heads (without
// the softmax options and the plan).
static DecodeAttentionParams layer_params(const GpuKvLayer::Impl& m, const DeviceBuffer& pool,
                                          int n_heads_q);

size_t GpuKvLayer::workspace_bytes(int n_heads_q) const {
  const Impl& m = *impl_;
  const int H = m.cfg.n_heads_kv;
  TQ_REQUIRE(n_heads_q >= H && n_heads_q % H == 0, "GPU attend: n_heads_q ", n_heads_q,
             " is not a multiple of n_heads_kv ", H);
  // Room for the most splits either kernel may plan (decode_attention_tc.cu
  // splits finer than split_pages when few sequences would leave SMs idle).
  const int n_splits = decode_max_splits(layer_params(m, m.pool, n_heads_q));
  return size_t(m.cfg.max_seqs) * n_heads_q * n_splits * (m.hk.dim + 1) * sizeof(float);
}

void GpuKvLayer::attend(const float* q, int n_heads_q, const AttentionParams& params, float* out,
                        float* lse, void* workspace, size_t ws_bytes, Stream stream) const {
  const Impl& m = *impl_;
  const int H = m.cfg.n_heads_kv, D = m.hk.dim;
  TQ_REQUIRE(n_heads_q >= H && n_heads_q % H == 0, "GPU attend: n_heads_q ", n_heads_q,
             " is not a multiple of n_heads_kv ", H);
  const int g = n_heads_q / H;
  TQ_REQUIRE(g * D <= 16384, "GPU attend: GQA group of ", g, " heads at head_dim ", D,
             " exceeds the kernel's shared memory (group * head_dim <= 16384)");
  TQ_REQUIRE(ws_bytes >= workspace_bytes(n_heads_q), "GPU attend: workspace of ", ws_bytes,
             " bytes, need ", workspace_bytes(n_heads_q));
  DecodeAttentionParams p = layer_params(m, m.pool, n_heads_q);
  p.n_seqs = n_seqs();
  p.sm_scale = params.scale > 0 ? params.scale : 1.0f / std::sqrt(static_cast<float>(D));
  p.softcap = params.softcap;
  p.window = params.window;
  p.n_sinks = params.n_sinks;
  // Picks the kernel (tensor cores where supported, else the reference: see
  // kernels.hpp) and its splits; the partials below use the planned count.
  plan_decode_attention(p, m.len.data());
  float* part_o = static_cast<float*>(workspace);
  float* part_lse = part_o + size_t(m.cfg.max_seqs) * n_heads_q * p.n_splits * D;
  launch_decode_attention(p, q, part_o, part_lse, out, lse, stream);
}

static DecodeAttentionParams layer_params(const GpuKvLayer::Impl& m, const DeviceBuffer& pool,
                                          int n_heads_q) {
  DecodeAttentionParams p;
  p.k = m.kf;
  p.v = m.vf;
  p.pool = pool.as<uint8_t>();
  p.page_bytes = m.page_bytes;
  p.v_region_offset = size_t(m.cfg.page_tokens) * m.cfg.n_heads_kv * m.hk.record_bytes;
  p.page_tokens = m.cfg.page_tokens;
  p.n_heads_kv = m.cfg.n_heads_kv;
  p.group = n_heads_q / m.cfg.n_heads_kv;
  p.page_table = m.page_table.as<int>();
  p.max_pages_per_seq = m.cfg.max_pages_per_seq;
  p.lengths = m.lengths.as<int>();
  p.n_seqs = static_cast<int>(m.len.size());
  p.split_pages = m.cfg.split_pages;
  p.n_splits = m.n_splits;
  return p;
}

}  // namespace tq::cuda

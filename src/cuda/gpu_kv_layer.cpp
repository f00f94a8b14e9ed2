// Host side of the GPU KV layer (include/turboquant/cuda.hpp): device page
// pool, page tables and the launches. Compiled by the C++ compiler against
// the CUDA runtime; the kernels live in the .cu files beside it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/kernels.hpp"
#include "cuda/mse_append.hpp"
#include "quant/quantizers.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/cuda_bench.hpp"
#include "turboquant/half.hpp"

namespace tq::cuda {

const char* to_string(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
  }
  return "?";
}
size_t dtype_bytes(DType t) { return t == DType::f32 ? 4 : 2; }

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

// Whether attend on `stream` plans the tensor-core kernel's splits on the
// device (SplitPlanning): under stream capture by default, since the host's
// lengths would be frozen into the graph with the capture's plan.
bool plans_on_device(Stream stream) {
  switch (decode_split_planning()) {
    case SplitPlanning::host: return false;
    case SplitPlanning::device: return true;
    case SplitPlanning::automatic: break;
  }
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  TQ_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Host copy of what a format needs on the device, validated. A channel
// split (split = true) has no codes of its own: its two segments and the
// per-head channel table say everything, bits and code_bytes are 0.
struct HostSegment {
  int dim = 0, bits = 0, code_bytes = 0, offset = 0, scale_f32 = 0;
  std::vector<float> signs1, signs2, boundaries, centroids;
  std::vector<int> perm, blocks;
};
struct HostFormat {
  int dim, bits;
  std::vector<float> signs, boundaries, centroids;
  float post_scale;
  int code_bytes, scale_f32, record_bytes;
  bool split = false;
  HostSegment seg[2];
  std::vector<int> channels;  // split: [n_heads_kv, dim] (SplitFormat::channels)
};

void require_gpu_spec(const FormatSpec& s, const char* which) {
  TQ_REQUIRE(s.method == Method::mse, "GPU KV layer: ", which, " format ", to_string(s),
             " is not supported (expected tq-mse)");
  TQ_REQUIRE(s.scale == ScaleMode::norm, "GPU KV layer: ", which, " format ", to_string(s),
             ": only scale=norm is supported on the GPU");
  TQ_REQUIRE(s.rotation == RotationKind::hadamard, "GPU KV layer: ", which, " format ",
             to_string(s), ": only rot=hadamard is supported on the GPU");
}

// One segment of a split: an MseQuantizer over its channels, whose rotation
// is Rotation's hadamard (one round for a power-of-two dim, two otherwise).
HostSegment host_segment(const quant::MseQuantizer& q, int offset) {
  HostSegment g;
  g.dim = q.dim();
  g.bits = static_cast<int>(q.spec().bits);
  g.code_bytes = static_cast<int>(packed_bytes(g.dim, g.bits));
  g.offset = offset;
  g.scale_f32 = q.spec().scale_type == ScaleType::f32;
  const auto& st = q.rotation().stages();
  using Op = RotationStage::Op;
  const bool one = st.size() == 2, two = st.size() == 5;
  TQ_ASSERT((one || two) && st[0].op == Op::signs && st[1].op == Op::hadamard_blocks);
  TQ_ASSERT(one || (st[2].op == Op::permute && st[3].op == Op::signs && st[4].op == Op::hadamard_blocks &&
                    st[4].blocks == st[1].blocks));
  TQ_ASSERT(st[1].blocks.size() <= size_t(kMaxRotationBlocks));
  g.signs1 = st[0].signs;
  g.blocks = st[1].blocks;
  if (two) {
    g.perm = st[2].perm;
    g.signs2 = st[3].signs;
  }
  const Codebook& cb = sphere_codebook(q.spec().law, g.dim, g.bits);
  g.boundaries = cb.boundaries;
  g.centroids = cb.centroids;
  return g;
}

// One head's row of SplitFormat::channels: its hi channels in their order,
// then the rest ascending (SplitQuantizer's lo order).
void append_channel_row(std::vector<int>& table, const std::vector<int>& hi, int dim) {
  std::vector<char> taken(dim, 0);
  for (int c : hi) {
    taken[c] = 1;
    table.push_back(c);
  }
  for (int c = 0; c < dim; ++c)
    if (!taken[c]) table.push_back(c);
}

// hi: per KV head, the channels at the higher width (GpuKvLayerConfig::
// k_hi_channels / v_hi_channels); empty: the quantizer's own for every head,
// a placeholder until the layer chooses them (Impl::calibrate).
HostFormat host_format(const Quantizer& q, const char* which, int n_heads,
                       const std::vector<std::vector<int>>& hi) {
  const FormatSpec& s = q.spec();
  const int d = q.dim();
  require_gpu_spec(s, which);
  TQ_REQUIRE(d == 64 || d == 128 || d == 256, "GPU KV layer: head_dim ", d,
             " is not supported (expected 64, 128 or 256)");
  HostFormat f;
  f.dim = d;
  f.post_scale = 1.0f / std::sqrt(static_cast<float>(d));  // as Rotation::run computes it
  f.record_bytes = static_cast<int>(q.bytes_per_vector());
  if (is_split(s)) {
    const auto* sq = dynamic_cast<const quant::SplitQuantizer*>(&q);
    TQ_ASSERT(sq != nullptr);
    f.split = true;
    f.bits = f.code_bytes = 0;
    f.seg[0] = host_segment(sq->hi_part(), 0);
    f.seg[1] = host_segment(sq->lo_part(), static_cast<int>(sq->hi_part().bytes_per_vector()));
    f.scale_f32 = f.seg[0].scale_f32;
    TQ_ASSERT(size_t(f.record_bytes) == sq->hi_part().bytes_per_vector() + sq->lo_part().bytes_per_vector());
    TQ_REQUIRE(hi.empty() || int(hi.size()) == n_heads, "GPU KV layer: ", which, " hi channels given for ",
               hi.size(), " heads, the layer has ", n_heads);
    const int n_hi = f.seg[0].dim;
    for (int h = 0; h < n_heads; ++h) {
      const std::vector<int>& his = hi.empty() ? sq->hi_channels() : hi[h];
      TQ_REQUIRE(int(his.size()) == n_hi, "GPU KV layer: ", which, " format ", to_string(s), " codes ", n_hi,
                 " channels at higher precision, but ", his.size(), " were given for head ", h);
      std::vector<char> taken(d, 0);
      for (int c : his) {
        TQ_REQUIRE(c >= 0 && c < d, "GPU KV layer: ", which, " hi channel ", c, " of head ", h,
                   " is outside 0..", d - 1);
        TQ_REQUIRE(!taken[c], "GPU KV layer: ", which, " hi channel ", c, " of head ", h, " is listed twice");
        taken[c] = 1;
      }
      append_channel_row(f.channels, his, d);
    }
    return f;
  }
  const auto* mq = dynamic_cast<const quant::MseQuantizer*>(&q);
  TQ_REQUIRE(mq != nullptr && s.bits == std::floor(s.bits), "GPU KV layer: ", which, " format ", to_string(s),
             " is not supported (expected tq-mse)");
  TQ_REQUIRE(hi.empty(), "GPU KV layer: ", which, " hi channels were given, but format ", to_string(s),
             " has no channel split");
  const auto& st = mq->rotation().stages();
  TQ_ASSERT(st.size() == 2 && st[0].op == RotationStage::Op::signs &&
            st[1].op == RotationStage::Op::hadamard_blocks && st[1].blocks.size() == 1);
  f.bits = static_cast<int>(s.bits);
  f.signs = st[0].signs;
  const Codebook& cb = sphere_codebook(s.law, d, f.bits);
  f.boundaries = cb.boundaries;
  f.centroids = cb.centroids;
  f.code_bytes = static_cast<int>(packed_bytes(d, f.bits));
  f.scale_f32 = s.scale_type == ScaleType::f32;
  TQ_ASSERT(size_t(f.record_bytes) == f.code_bytes + scale_bytes(s.scale_type));
  return f;
}

// The device view of a split's tables, uploaded into `buf` (floats and
// ints as 4-byte words).
// K and V decode with the same centroids (segment by segment for splits).
bool same_codebooks(const HostFormat& k, const HostFormat& v) {
  if (k.split != v.split) return false;
  if (!k.split) return k.centroids == v.centroids;
  return k.seg[0].centroids == v.seg[0].centroids && k.seg[1].centroids == v.seg[1].centroids;
}

SplitSearch split_search(const HostFormat& h) {
  SplitSearch s;
  if (h.split)
    for (int i = 0; i < 2; ++i) s.seg[i] = search_table(h.seg[i].boundaries, h.seg[i].bits);
  return s;
}

SplitFormat upload_split(const HostFormat& h, DeviceBuffer& buf) {
  SplitFormat f;
  if (!h.split) return f;
  std::vector<uint32_t> w;
  auto put_f = [&](const std::vector<float>& a) {
    const size_t at = w.size();
    for (float x : a) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      w.push_back(u);
    }
    return at;
  };
  auto put_i = [&](const std::vector<int>& a) {
    const size_t at = w.size();
    for (int x : a) w.push_back(static_cast<uint32_t>(x));
    return at;
  };
  size_t o[2][5];
  for (int s = 0; s < 2; ++s) {
    const HostSegment& g = h.seg[s];
    o[s][0] = put_f(g.signs1);
    o[s][1] = put_f(g.signs2);
    o[s][2] = put_i(g.perm);
    o[s][3] = put_f(g.boundaries);
    o[s][4] = put_f(g.centroids);
  }
  const size_t ch = put_i(h.channels);
  buf = DeviceBuffer(w.size() * 4);
  buf.upload(w.data(), w.size() * 4);
  const float* fb = buf.as<float>();
  const int* ib = buf.as<int>();
  f.n_seg = 2;
  f.channels = ib + ch;
  for (int s = 0; s < 2; ++s) {
    const HostSegment& g = h.seg[s];
    SplitSegment& d = f.seg[s];
    d.dim = g.dim;
    d.bits = g.bits;
    d.offset = g.offset;
    d.code_bytes = g.code_bytes;
    d.scale_f32 = g.scale_f32;
    d.boundaries = fb + o[s][3];
    d.centroids = fb + o[s][4];
    d.rot.dim = g.dim;
    d.rot.signs1 = fb + o[s][0];
    d.rot.signs2 = g.perm.empty() ? nullptr : fb + o[s][1];
    d.rot.perm = g.perm.empty() ? nullptr : ib + o[s][2];
    d.rot.n_blocks = static_cast<int>(g.blocks.size());
    for (size_t b = 0; b < g.blocks.size(); ++b) {
      d.rot.blocks[b] = g.blocks[b];
      d.rot.block_scale[b] = 1.0f / std::sqrt(static_cast<float>(g.blocks[b]));  // as Rotation::run
    }
  }
  return f;
}

}  // namespace

// Page-locked host memory: the append's one upload and its status readback
// are asynchronous copies from / to it.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() {
    if (p_) (void)cudaFreeHost(p_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void reserve(size_t bytes) {
    if (bytes <= n_) return;
    const size_t want = std::max(bytes, 2 * n_);
    if (p_) TQ_CUDA_CHECK(cudaFreeHost(p_));
    p_ = nullptr;
    n_ = 0;
    TQ_CUDA_CHECK(cudaHostAlloc(&p_, want, cudaHostAllocDefault));
    n_ = want;
  }
  uint8_t* data() const { return static_cast<uint8_t*>(p_); }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

struct GpuKvLayer::Impl {
  GpuKvLayerConfig cfg;
  HostFormat hk, hv;
  MseDeviceFormat kf, vf;
  AppendFormat ka, va;  // the append kernel's view of the formats (not for a split)
  SplitFormat ksf, vsf;  // channel splits (n_seg 0: none)
  SplitSearch ks_search, vs_search;  // their append kernel's search tables
  DeviceBuffer k_split_consts, v_split_consts;
  size_t page_bytes = 0;
  int n_splits = 0;
  DeviceBuffer consts, pool, page_table, lengths;
  DeviceBuffer staging, upload;  // append scratch, grown on demand
  PinnedBuffer host_status;
  // The append's uploads come from a ring of pinned buffers: an asynchronous
  // append returns before its copy has run, so the next one must not
  // overwrite that buffer (it waits on the copy of kUploadRing calls ago).
  static constexpr int kUploadRing = 4;
  PinnedBuffer upload_ring[kUploadRing];
  cudaEvent_t upload_done[kUploadRing] = {};
  int upload_next = 0;
  uint8_t* upload_slot(size_t bytes, int& slot) {
    slot = upload_next;
    upload_next = (upload_next + 1) % kUploadRing;
    if (upload_done[slot] == nullptr)
      TQ_CUDA_CHECK(cudaEventCreateWithFlags(&upload_done[slot], cudaEventDisableTiming));
    else
      TQ_CUDA_CHECK(cudaEventSynchronize(upload_done[slot]));
    upload_ring[slot].reserve(bytes);
    return upload_ring[slot].data();
  }
  ~Impl() {
    for (cudaEvent_t e : upload_done)
      if (e != nullptr) (void)cudaEventDestroy(e);
    for (cudaEvent_t e : {step_fork, step_join})
      if (e != nullptr) (void)cudaEventDestroy(e);
    if (step_side != nullptr) (void)cudaStreamDestroy(step_side);
  }
  // Asynchronous decode appends (append_batch_device_async): the host
  // commits its bookkeeping at once; a refusal found on the device is OR'd
  // into `sticky` (device int), which makes every later append of the layer
  // a no-op on the device until settle() has brought the host back in line.
  DeviceBuffer sticky;
  bool async_unchecked = false;
  cudaStream_t async_stream = nullptr;

  // Captured decode steps (reserve_steps / append_step_device): the batch's
  // sequence ids, the steps' status word and count of finished tiles live on
  // the device (step_buf: [status, done, pad][seqs], allocated once at its
  // largest, so that a captured graph's addresses stay valid whatever batch
  // a later reserve_steps gives), as do the tokens each sequence may reach
  // (step_limits, mirrored in step_limit_host); the append kernels compute
  // their tiles (AppendStepTiles).
  // steps_captured: append_step_device has been called, so replays of a
  // graph the host never sees may have moved the device's lengths (and
  // error word) at any time: from then on every settle() reads them back.
  DeviceBuffer step_buf, step_limits;
  // A layer with dense tokens plans each step on the device, into
  // step_dense, also allocated once at its largest (max_seqs rows): [new
  // k][new v][page k][page v] rows, [copies][states][active]; see StepDense.
  // The step kernel uses only `active` (it plans inside its warps); the
  // tile kernels' path (launch_dense_step_plan: splits other than two
  // halves) all of it.
  DeviceBuffer step_dense;
  struct StepDense {
    uint8_t *new_k, *new_v, *page_k, *page_v;
    DenseRowCopy* copies;
    int *states, *active;
  };
  static size_t align16(size_t x) { return (x + 15) & ~size_t(15); }
  size_t step_dense_bytes() const {
    const size_t rows = size_t(cfg.max_seqs) * dense_row_bytes();
    return 4 * align16(rows) + align16(size_t(cfg.max_seqs) * sizeof(DenseRowCopy)) +
           align16(size_t(cfg.max_seqs) * 4 * sizeof(int)) + size_t(cfg.max_seqs) * sizeof(int);
  }
  StepDense step_dense_parts() const {
    uint8_t* b = step_dense.as<uint8_t>();
    const size_t rows = align16(size_t(cfg.max_seqs) * dense_row_bytes());
    StepDense d;
    d.new_k = b;
    d.new_v = b + rows;
    d.page_k = b + 2 * rows;
    d.page_v = b + 3 * rows;
    d.copies = reinterpret_cast<DenseRowCopy*>(b + 4 * rows);
    d.states = reinterpret_cast<int*>(b + 4 * rows + align16(size_t(cfg.max_seqs) * sizeof(DenseRowCopy)));
    d.active = d.states + 4 * size_t(cfg.max_seqs);  // align16 of the states is a multiple of 4 ints
    return d;
  }
  std::vector<int> step_limit_host;
  int step_n = 0, step_tiles = 0, step_heads_per_tile = 0;
  bool steps_captured = false;
  // A step's V kernel runs beside its K kernel on step_side (fork / join by
  // two events, which a stream capture records as graph edges).
  cudaStream_t step_side = nullptr;
  cudaEvent_t step_fork = nullptr, step_join = nullptr;
  int step_heads_per_tile_max() const { return std::min(cfg.n_heads_kv, append_rows_per_tile(hk.dim)); }
  int* step_status() const { return step_buf.as<int>(); }
  int* step_done() const { return step_buf.as<int>() + 1; }
  int* step_seqs() const { return reinterpret_cast<int*>(step_buf.as<uint8_t>() + 16); }
  // Gives up every reservation (limits 0: every later step is refused).
  void drop_reservations() {
    if (step_limits.size() == 0) return;
    std::fill(step_limit_host.begin(), step_limit_host.end(), 0);
    TQ_CUDA_CHECK(cudaMemset(step_limits.data(), 0, step_limits.size()));
    step_n = 0;
  }

  // Channel splits whose hi channels the caller did not give
  // (GpuKvLayerConfig::k_hi_channels / v_hi_channels empty): chosen here per
  // head, as KvCache chooses them, from the first tokens the layer
  // compresses (up to 4096 of the first append that reaches the pages,
  // rounded to the layer's format), once. A call that is then refused for
  // its values (NaN/Inf, f16 range) undoes the choice, as KvCache never
  // makes it for such a call.
  static constexpr int kCalibrationTokens = 4096;  // KvCache's
  bool k_auto = false, v_auto = false, calibrated = false;
  std::vector<int> k_default_channels, v_default_channels;
  bool needs_calibration() const { return (k_auto || v_auto) && !calibrated; }
  // Rows [0, min(total, 4096)) of k, v (device, dtype; [total, H, D]).
  // False (nothing chosen) when a value is one the append will refuse.
  bool calibrate(const void* k, const void* v, DType dtype, int total, cudaStream_t stream) {
    const int n = std::min(total, kCalibrationTokens), H = cfg.n_heads_kv, D = hk.dim;
    const size_t elems = size_t(n) * H * D, bytes = elems * dtype_bytes(dtype);
    std::vector<uint8_t> raw(2 * bytes);
    TQ_CUDA_CHECK(cudaMemcpyAsync(raw.data(), k, bytes, cudaMemcpyDeviceToHost, stream));
    TQ_CUDA_CHECK(cudaMemcpyAsync(raw.data() + bytes, v, bytes, cudaMemcpyDeviceToHost, stream));
    TQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> x(2 * elems);
    for (size_t i = 0; i < 2 * elems; ++i) {
      float a;
      if (dtype == DType::f32) {
        std::memcpy(&a, raw.data() + 4 * i, 4);
      } else {
        uint16_t u;
        std::memcpy(&u, raw.data() + 2 * i, 2);
        a = dtype == DType::f16 ? half_to_float(u) : bf16_to_float(u);
      }
      if (!std::isfinite(a) || (cfg.round_to == DType::f16 && std::fabs(a) > 65504.0f)) return false;
      if (cfg.round_to == DType::f16) a = half_to_float(float_to_half(a));
      else if (cfg.round_to == DType::bf16) a = bf16_to_float(float_to_bf16(a));
      x[i] = a;
    }
    std::vector<float> head(size_t(n) * D);
    for (int key = 1; key >= 0; --key) {
      if (!(key ? k_auto : v_auto)) continue;
      HostFormat& f = key ? hk : hv;
      const float* src = x.data() + (key ? 0 : elems);
      f.channels.clear();
      for (int h = 0; h < H; ++h) {
        for (int t = 0; t < n; ++t)
          std::memcpy(&head[size_t(t) * D], src + (size_t(t) * H + h) * D, sizeof(float) * D);
        append_channel_row(f.channels, select_outlier_channels(head.data(), size_t(n), D, f.seg[0].dim), D);
      }
      (key ? ksf : vsf) = upload_split(f, key ? k_split_consts : v_split_consts);
    }
    calibrated = true;
    return true;
  }
  void uncalibrate() {
    if (k_auto) {
      hk.channels = k_default_channels;
      ksf = upload_split(hk, k_split_consts);
    }
    if (v_auto) {
      hv.channels = v_default_channels;
      vsf = upload_split(hv, v_split_consts);
    }
    calibrated = false;
  }
  // Which kernel a captured step's append runs (append_step_device): the
  // step kernel for tq-mse K and V, two-halves splits on both, or outlier
  // channels in K beside a tq-mse V; the tile kernels otherwise.
  enum class StepPath { mse, halves, outlier_k, tiles };
  StepPath step_path() const {
    if (!hk.split && !hv.split && mse_step_supported(ka, va)) return StepPath::mse;
    if (hk.split && hv.split && split_step_supported(ksf, vsf, ks_search, vs_search, hk.dim)) return StepPath::halves;
    if (hk.split && !hv.split && outlier_step_supported(ksf, va, hk.dim)) return StepPath::outlier_k;
    return StepPath::tiles;
  }

  std::vector<std::vector<int>> pages;  // per sequence; -1: freed by the sliding window
  std::vector<int> len;                 // per sequence
  std::vector<int> first_page;          // per sequence: pages before it were freed (sliding window)
  std::vector<int> free_pages;          // stack

  // Sliding window (cfg.sliding_window = W): gives back the pages no later
  // query can see. A query at page index len - 1 + dense_window (a sequence
  // with pages has a full dense window) with window <= W sees page indices
  // >= lo = len + dense_window - W, and the tensor-core kernel's splits start
  // at lo rounded down to a 32-token pair (decode_split_start), so the pages
  // before that pair's page go. Only at points where every length is
  // confirmed on the device (no unchecked append), so that no refusal can
  // roll a sequence back below what was freed. The device page table keeps
  // the old ids: the tensor-core kernel never reads them and the reference
  // kernel reads them masked (any page of the pool holds finite records).
  void evict() {
    if (cfg.sliding_window <= 0) return;
    const int P = cfg.page_tokens;
    for (size_t s = 0; s < len.size(); ++s) {
      const long lo = long(len[s]) + cfg.dense_window - cfg.sliding_window;
      if (len[s] == 0 || lo <= 0) continue;
      const int keep = int(std::min<long>((lo & ~31L) / P, len[s] / P));
      for (; first_page[s] < keep; ++first_page[s]) {
        free_pages.push_back(pages[s][first_page[s]]);
        pages[s][first_page[s]] = -1;
      }
    }
  }
  // Dense tokens (cfg.dense_prefix / dense_window): f16 rows [max_seqs,
  // prefix slots + window slots, n_heads_kv, dim], prefix slots first; the
  // window is a ring. dense_state: device [max_seqs, 3] {n_pre, win_start,
  // win_count}, mirrored in `dense`.
  struct DenseSeq {
    int n_pre = 0, win_start = 0, win_count = 0;
  };
  DeviceBuffer dense_k, dense_v, dense_state, dense_in, upload_dense;
  std::vector<DenseSeq> dense;
  std::vector<int> state_host;  // [max_seqs, 3]: the source of dense_state's async uploads
  bool has_dense() const { return cfg.dense_window > 0 || cfg.dense_prefix > 0; }
  int dense_slots() const { return cfg.dense_prefix + cfg.dense_window; }
  size_t dense_row_bytes() const { return size_t(cfg.n_heads_kv) * hk.dim * 2; }
  uint8_t* dense_row(const DeviceBuffer& b, int seq, int slot) const {
    return b.as<uint8_t>() + (size_t(seq) * dense_slots() + slot) * dense_row_bytes();
  }
  void require_no_dense(const char* what) const {
    TQ_REQUIRE(!has_dense(), "GPU KV layer: ", what, " with dense_window ", cfg.dense_window,
               " / dense_prefix ", cfg.dense_prefix, " is not supported: the newest and first tokens of such a "
               "layer are dense, not records");
  }

  void check_seq(int seq) const {
    TQ_REQUIRE(seq >= 0 && seq < static_cast<int>(len.size()), "GPU KV layer: sequence ", seq,
               " does not exist (", len.size(), " sequences)");
  }
  PagedRegion region(bool v) const {
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

  // Tiles of tokens [pos0, pos0 + n) of sequence s (its pages allocated),
  // whose rows start at token `row0` of the input: per page, runs of up to
  // rows_per_tile / nh consecutive slots, times the head chunks.
  void add_tiles(int s, int pos0, int n, int row0, std::vector<AppendTile>& out) const {
    const int P = cfg.page_tokens, H = cfg.n_heads_kv;
    const int rows = append_rows_per_tile(hk.dim);
    const int nh = std::min(H, rows), n_max = std::max(1, rows / nh);
    for (int t = 0; t < n;) {
      const int pos = pos0 + t, slot = pos % P;
      const int take = std::min({n - t, n_max, P - slot});
      for (int h0 = 0; h0 < H; h0 += nh) {
        AppendTile a;
        a.token0 = row0 + t;
        a.page = pages[s][pos / P];
        a.slot0 = static_cast<uint16_t>(slot);
        a.n = static_cast<uint16_t>(take);
        a.h0 = static_cast<uint16_t>(h0);
        a.nh = static_cast<uint16_t>(std::min(nh, H - h0));
        out.push_back(a);
      }
      t += take;
    }
  }

  // The quantize-append kernels of K and V over device tiles (V on
  // stream_v if given: the two are independent).
  void launch_kernels(const void* k, const void* v, DType dtype, const AppendTile* tiles,
                      int n_tiles, int* status, cudaStream_t stream, cudaStream_t stream_v = nullptr,
                      const AppendStepTiles* step = nullptr) const {
    AppendLaunch a;
    a.dtype = dtype;
    a.round_to = cfg.round_to;
    a.n_heads = cfg.n_heads_kv;
    a.tiles = tiles;
    if (step != nullptr) a.step = *step;
    a.n_tiles = n_tiles;
    a.status = status;
    a.x = k;
    a.region = region(false);
    if (hk.split) launch_split_append_tiles(a, ksf, ks_search, hk.dim, hk.record_bytes, stream);
    else launch_mse_append_tiles(a, ka, stream);
    a.x = v;
    a.region = region(true);
    cudaStream_t sv = stream_v != nullptr ? stream_v : stream;
    if (hv.split) launch_split_append_tiles(a, vsf, vs_search, hv.dim, hv.record_bytes, sv);
    else launch_mse_append_tiles(a, va, sv);
  }

  // Device input as the kernel needs it: 16-byte aligned (copied otherwise).
  // k, v: [total, n_heads_kv, dim] of dtype.
  std::pair<const void*, const void*> aligned_input(const void* k, const void* v, int total,
                                                    DType dtype, cudaStream_t stream) {
    const size_t n = size_t(total) * cfg.n_heads_kv * hk.dim * dtype_bytes(dtype);
    auto misaligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) != 0; };
    if (!misaligned(k) && !misaligned(v)) return {k, v};
    ensure(staging, 2 * n);
    uint8_t* sk = staging.as<uint8_t>();
    TQ_CUDA_CHECK(cudaMemcpyAsync(sk, k, n, cudaMemcpyDeviceToDevice, stream));
    TQ_CUDA_CHECK(cudaMemcpyAsync(sk + n, v, n, cudaMemcpyDeviceToDevice, stream));
    return {sk, sk + n};
  }

  // An append enqueued on the stream but not yet checked: its pages are
  // allocated on the host, its lengths are committed on the device only if
  // the status word stays 0 (and the extra status, if any).
  struct RunsInFlight {
    std::vector<std::pair<int, int>> runs;
    std::vector<std::pair<int, size_t>> added;  // (seq, old page count) for the rollback
    int* status = nullptr;                      // device; null: nothing was enqueued
    bool calibrated_now = false;                // this append chose the split channels
  };
  void rollback(const RunsInFlight& f) {
    if (f.calibrated_now) uncalibrate();
    for (auto it = f.added.rbegin(); it != f.added.rend(); ++it)
      while (pages[it->first].size() > it->second) {
        free_pages.push_back(pages[it->first].back());
        pages[it->first].pop_back();
      }
  }
  // The status word back on the host: the call's one synchronisation.
  int read_status(const int* status, cudaStream_t stream) {
    host_status.reserve(sizeof(int));
    int* st = reinterpret_cast<int*>(host_status.data());
    TQ_CUDA_CHECK(cudaMemcpyAsync(st, status, sizeof(int), cudaMemcpyDeviceToHost, stream));
    TQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    return *st;
  }

  // Appends tokens given as (sequence, count) runs; rows of k, v (device,
  // dtype) in that order. One upload (tiles, page-table entries, lengths,
  // the zeroed status word), the two append kernels, the commit kernel, one
  // status readback: a single synchronisation.
  void append_runs(const std::vector<std::pair<int, int>>& runs, const void* k, const void* v,
                   DType dtype, cudaStream_t stream) {
    RunsInFlight f = enqueue_runs(runs, k, v, dtype, stream, nullptr);
    if (f.status == nullptr) return;
    int st = 0;
    try {
      st = read_status(f.status, stream);
    } catch (...) {
      rollback(f);
      throw;
    }
    finish_runs(f, st);
  }

  // The append of append_runs up to the commit kernel, enqueued, without the
  // readback. What the host can check (capacity, pages, null input) is
  // refused here before anything is enqueued. extra_status (device, or
  // null): flags of an earlier step of the same call, OR'd into the status
  // by the commit kernel, so that they too keep the lengths uncommitted.
  // sticky: the layer's error word for an asynchronous append (null for a
  // synchronous one, whose refusal the host reads and undoes itself).
  RunsInFlight enqueue_runs(const std::vector<std::pair<int, int>>& runs, const void* k, const void* v,
                            DType dtype, cudaStream_t stream, const int* extra_status, int* sticky_word = nullptr) {
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
      if (size_t(need) > pages[s].size()) need_new += need - pages[s].size();  // (reserve_steps: already there)
      total += n;
    }
    RunsInFlight f;
    if (total == 0) return f;
    TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: append of ", total,
               " tokens from a null pointer");
    TQ_REQUIRE(need_new <= free_pages.size(), "GPU KV layer: page pool exhausted (", need_new,
               " pages needed, ", free_pages.size(), " free)");
    f.runs = runs;
    try {
      std::vector<AppendTile> tiles;
      std::vector<int> pt, lens;  // (index, value) pairs
      int row = 0;
      for (auto [s, n] : runs) {
        f.added.emplace_back(s, pages[s].size());
        const size_t old = pages[s].size();
        while (pages[s].size() * P < size_t(len[s]) + n) {
          pages[s].push_back(free_pages.back());
          free_pages.pop_back();
        }
        for (size_t i = old; i < pages[s].size(); ++i) {
          pt.push_back(int(size_t(s) * cfg.max_pages_per_seq + i));
          pt.push_back(pages[s][i]);
        }
        add_tiles(s, len[s], n, row, tiles);
        lens.push_back(s);
        lens.push_back(len[s] + n);
        row += n;
      }
      const auto [dk, dv] = aligned_input(k, v, total, dtype, stream);
      if (needs_calibration()) f.calibrated_now = calibrate(dk, dv, dtype, total, stream);
      // [status, pad][tiles][page-table pairs][length pairs]
      const size_t tiles_off = 16, pt_off = tiles_off + tiles.size() * sizeof(AppendTile);
      const size_t len_off = pt_off + pt.size() * sizeof(int);
      const size_t bytes = len_off + lens.size() * sizeof(int);
      int slot = 0;
      uint8_t* h = upload_slot(bytes, slot);
      std::memset(h, 0, tiles_off);
      std::memcpy(h + tiles_off, tiles.data(), tiles.size() * sizeof(AppendTile));
      std::memcpy(h + pt_off, pt.data(), pt.size() * sizeof(int));
      std::memcpy(h + len_off, lens.data(), lens.size() * sizeof(int));
      ensure(upload, bytes);
      uint8_t* d = upload.as<uint8_t>();
      TQ_CUDA_CHECK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream));
      TQ_CUDA_CHECK(cudaEventRecord(upload_done[slot], stream));
      int* status = reinterpret_cast<int*>(d);
      launch_kernels(dk, dv, dtype, reinterpret_cast<const AppendTile*>(d + tiles_off),
                     int(tiles.size()), status, stream);
      launch_append_commit(reinterpret_cast<const int*>(d + pt_off), int(pt.size() / 2),
                           reinterpret_cast<const int*>(d + len_off), int(lens.size() / 2),
                           page_table.as<int>(), lengths.as<int>(), status, extra_status, sticky_word, stream);
      f.status = status;
    } catch (...) {  // the sequences are left as they were
      rollback(f);
      throw;
    }
    return f;
  }

  // The end of an enqueued append, given its status word read back: a
  // refusal frees the pages it took (the device lengths were not committed)
  // and throws; otherwise the host lengths follow the device's.
  void finish_runs(RunsInFlight f, int st) {
    // KvCache keeps its channel choice when only a scale overflows (it chose
    // them before encoding); values it refuses up front never get that far.
    if (st == kStatusScaleOverflow) f.calibrated_now = false;
    if (st != 0) rollback(f);
    TQ_REQUIRE(!(st & kStatusNonFinite),
               "GPU KV layer: append refused: a key or value has a NaN/Inf component or "
               "its squared norm overflows float");
    TQ_REQUIRE(!(st & kStatusDenseOverflow),
               "GPU KV layer: append refused: a key or value component exceeds the f16 range "
               "(|x| > 65504) of round_to f16 (KvCache's f16 dense format refuses it too); "
               "use round_to bf16 or f32");
    TQ_REQUIRE(!(st & kStatusScaleOverflow),
               "GPU KV layer: append refused: a scale does not fit fp16 (max 65504); use a "
               "format with sf=f32");
    TQ_ASSERT(st == 0);
    for (auto [s, n] : f.runs) len[s] += n;
  }

  // Appended K/V (host or device, dtype) as f16 rows in dense_in: K rows
  // [0, n), V rows [n, 2n). Every element is rounded as KvCache's f16 dense
  // format rounds it, and what that refuses is refused here, before
  // anything changes. Synchronous.
  std::pair<uint8_t*, uint8_t*> to_f16_rows(const void* k, const void* v, int n, DType dtype,
                                            bool host, cudaStream_t stream) {
    const auto [dk, dv, status] = to_f16_rows_async(k, v, n, dtype, host, stream);
    check_dense_status(read_status(status, stream));
    return {dk, dv};
  }
  void check_dense_status(int st) const {
    TQ_REQUIRE(!(st & kStatusNonFinite),
               "GPU KV layer: append refused: a key or value has a NaN/Inf component (the sequence is unchanged)");
    TQ_REQUIRE(!(st & kStatusDenseOverflow),
               "GPU KV layer: append refused: a key or value component exceeds the f16 range (|x| > 65504) "
               "of the dense tokens (the sequence is unchanged)");
    TQ_ASSERT(st == 0);
  }
  // to_f16_rows without the check: the status word's device address comes
  // back with the rows, for a later single readback.
  std::tuple<uint8_t*, uint8_t*, int*> to_f16_rows_async(const void* k, const void* v, int n, DType dtype,
                                                         bool host, cudaStream_t stream) {
    const size_t row = size_t(cfg.n_heads_kv) * hk.dim, rb = dense_row_bytes(), elems = size_t(n) * row;
    ensure(dense_in, 2 * size_t(n) * rb + 16);
    uint8_t* dk = dense_in.as<uint8_t>() + 16;  // [status, pad] first
    uint8_t* dv = dk + size_t(n) * rb;
    int* status = dense_in.as<int>();
    const void* sk = k;
    const void* sv = v;
    if (host) {  // the raw input goes up first (into staging), then the same kernel
      const size_t in = elems * dtype_bytes(dtype);
      ensure(staging, 2 * in);
      TQ_CUDA_CHECK(cudaMemcpyAsync(staging.data(), k, in, cudaMemcpyHostToDevice, stream));
      TQ_CUDA_CHECK(cudaMemcpyAsync(staging.as<uint8_t>() + in, v, in, cudaMemcpyHostToDevice, stream));
      sk = staging.data();
      sv = staging.as<uint8_t>() + in;
    }
    TQ_CUDA_CHECK(cudaMemsetAsync(status, 0, sizeof(int), stream));
    launch_to_f16_rows(sk, dtype, elems, reinterpret_cast<uint16_t*>(dk), status, stream);
    launch_to_f16_rows(sv, dtype, elems, reinterpret_cast<uint16_t*>(dv), status, stream);
    return {dk, dv, status};
  }

  void copy_rows(uint8_t* dst, const uint8_t* src, int rows, cudaStream_t stream) const {
    if (rows > 0)
      TQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(rows) * dense_row_bytes(), cudaMemcpyDeviceToDevice, stream));
  }
  void upload_state(int seq, const DenseSeq& ds, cudaStream_t stream) {
    state_host[3 * seq] = ds.n_pre;
    state_host[3 * seq + 1] = ds.win_start;
    state_host[3 * seq + 2] = ds.win_count;
    TQ_CUDA_CHECK(cudaMemcpyAsync(dense_state.as<int>() + 3 * seq, &state_host[3 * seq], 3 * sizeof(int),
                                  cudaMemcpyHostToDevice, stream));
  }

  // Appends of a layer with dense tokens, as KvCache::append: a sequence's
  // first dense_prefix tokens go to the prefix, its newest dense_window stay
  // in the ring, and what leaves the ring (oldest first, then new tokens past
  // the window) is quantized into the pages from its f16 row by ONE
  // append_runs, the only step that can still refuse (an fp16 scale
  // overflow): a refusal leaves every sequence unchanged.
  // k, v: [n, n_heads_kv, dim] of dtype, host or device memory.
  void append_dense(int seq, const void* k, const void* v, int n, DType dtype, bool host,
                    cudaStream_t stream) {
    const int S = cfg.dense_prefix, W = cfg.dense_window;
    const size_t rb = dense_row_bytes();
    const auto [k16, v16] = to_f16_rows(k, v, n, dtype, host, stream);
    DenseSeq ds = dense[seq];
    const int pre_take = std::min(n, S - ds.n_pre), rest = n - pre_take;
    const int to_main = std::max(0, ds.win_count + rest - W);
    const int old_to_main = std::min(to_main, ds.win_count), new_to_main = to_main - old_to_main;
    const int new_to_win = rest - new_to_main;
    if (to_main > 0) {
      const size_t bytes = size_t(to_main) * rb;
      ensure(staging, 2 * bytes);
      uint8_t* sk = staging.as<uint8_t>();
      uint8_t* sv = sk + bytes;
      for (int i = 0; i < old_to_main;) {  // the ring's oldest tokens: at most two runs
        const int slot = (ds.win_start + i) % W, run = std::min(old_to_main - i, W - slot);
        copy_rows(sk + size_t(i) * rb, dense_row(dense_k, seq, S + slot), run, stream);
        copy_rows(sv + size_t(i) * rb, dense_row(dense_v, seq, S + slot), run, stream);
        i += run;
      }
      copy_rows(sk + size_t(old_to_main) * rb, k16 + size_t(pre_take) * rb, new_to_main, stream);
      copy_rows(sv + size_t(old_to_main) * rb, v16 + size_t(pre_take) * rb, new_to_main, stream);
      append_runs({{seq, to_main}}, sk, sv, DType::f16, stream);
    }
    // The dense slots (plain copies: nothing below refuses).
    copy_rows(dense_row(dense_k, seq, ds.n_pre), k16, pre_take, stream);
    copy_rows(dense_row(dense_v, seq, ds.n_pre), v16, pre_take, stream);
    ds.n_pre += pre_take;
    if (W > 0) {
      ds.win_start = (ds.win_start + old_to_main) % W;
      ds.win_count -= old_to_main;
      const size_t first = size_t(pre_take + new_to_main);  // row of the first new window token
      for (int j = 0; j < new_to_win;) {
        const int slot = (ds.win_start + ds.win_count) % W, run = std::min(new_to_win - j, W - slot);
        copy_rows(dense_row(dense_k, seq, S + slot), k16 + (first + j) * rb, run, stream);
        copy_rows(dense_row(dense_v, seq, S + slot), v16 + (first + j) * rb, run, stream);
        ds.win_count += run;
        j += run;
      }
    }
    upload_state(seq, ds, stream);
    TQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    dense[seq] = ds;
  }

  void read_dense_states() {
    TQ_CUDA_CHECK(cudaMemcpy(state_host.data(), dense_state.data(), state_host.size() * sizeof(int),
                             cudaMemcpyDeviceToHost));
    for (size_t s = 0; s < dense.size(); ++s)
      dense[s] = {state_host[3 * s], state_host[3 * s + 1], state_host[3 * s + 2]};
  }
  // After a refused asynchronous append: the host's lengths, pages and
  // dense states back to the device's (which never took the refused call
  // or any later one), and the error word cleared.
  void recover_from_device() {
    std::vector<int> dl(cfg.max_seqs);
    TQ_CUDA_CHECK(cudaMemcpy(dl.data(), lengths.data(), dl.size() * sizeof(int), cudaMemcpyDeviceToHost));
    const int P = cfg.page_tokens;
    for (size_t s = 0; s < len.size(); ++s) {
      len[s] = dl[s];
      const size_t keep = (size_t(len[s]) + P - 1) / P;
      while (pages[s].size() > keep) {
        free_pages.push_back(pages[s].back());
        pages[s].pop_back();
      }
    }
    if (has_dense()) read_dense_states();
    TQ_CUDA_CHECK(cudaMemset(sticky.data(), 0, sizeof(int)));
    drop_reservations();  // their pages past the lengths were just given back
  }
  // Waits for the asynchronous appends and captured steps since the last
  // check; if the device refused one, restores the layer
  // (recover_from_device) and throws. Steps may have been replayed on any
  // stream, so they are waited for by a device synchronisation.
  void settle() {
    if (!async_unchecked && !steps_captured) return evict();
    if (steps_captured) TQ_CUDA_CHECK(cudaDeviceSynchronize());
    else TQ_CUDA_CHECK(cudaStreamSynchronize(async_stream));
    int st = 0;
    TQ_CUDA_CHECK(cudaMemcpy(&st, sticky.data(), sizeof(int), cudaMemcpyDeviceToHost));
    async_unchecked = false;
    if (st == 0) {
      if (steps_captured) {  // the host's lengths (and dense states) catch up with the device's
        std::vector<int> dl(cfg.max_seqs);
        TQ_CUDA_CHECK(cudaMemcpy(dl.data(), lengths.data(), dl.size() * sizeof(int), cudaMemcpyDeviceToHost));
        for (size_t s = 0; s < len.size(); ++s) len[s] = dl[s];
        if (has_dense()) read_dense_states();
      }
      return evict();
    }
    recover_from_device();
    const char* why = (st & kStatusNonFinite) ? "a key or value has a NaN/Inf component or its squared norm overflows float"
                      : (st & kStatusDenseOverflow) ? "a key or value component exceeds the f16 range (|x| > 65504)"
                      : (st & kStatusReserve)
                          ? "a captured step would take a sequence past the tokens reserve_steps reserved for it"
                          : "a scale does not fit fp16 (max 65504; use a format with sf=f32)";
    TQ_THROW("GPU KV layer: an asynchronous append was refused (", why, "): that call and every later "
             "asynchronous append and captured step of this layer were dropped, and the step reservations "
             "given up; every sequence holds what it held before that call (n_tokens() says how much)");
  }
  void append_async(const std::vector<std::pair<int, int>>& runs, const int* seqs, int n, const void* k,
                    const void* v, DType dtype, cudaStream_t stream) {
    if ((async_unchecked && stream != async_stream) || steps_captured) settle();  // one stream at a time
    if (has_dense()) {
      append_batch_dense(seqs, n, k, v, dtype, stream, true);
    } else {
      RunsInFlight f = enqueue_runs(runs, k, v, dtype, stream, nullptr, sticky.as<int>());
      // The call that chose the split channels waits for its status (once
      // per layer): a refusal must undo the choice. The refusal itself is
      // still reported by check_appends (the error word has it).
      if (f.calibrated_now && read_status(f.status, stream) & (kStatusNonFinite | kStatusDenseOverflow))
        uncalibrate();
      if (f.status != nullptr) finish_runs(f, 0);
    }
    async_unchecked = true;
    async_stream = stream;
  }

  // One decode token for each of the sequences (distinct), device input:
  // per sequence the prefix, the ring, or (ring full) the ring's oldest
  // token to the pages and the new one into its slot.
  void append_batch_dense(const int* seqs, int n, const void* k, const void* v, DType dtype,
                          cudaStream_t stream, bool async) {
    const int S = cfg.dense_prefix, W = cfg.dense_window;
    const size_t rb = dense_row_bytes();
    const auto [k16, v16, f16_status] = to_f16_rows_async(k, v, n, dtype, false, stream);
    ensure(staging, 2 * size_t(std::max(n, 1)) * rb);
    uint8_t* sk = staging.as<uint8_t>();
    uint8_t* sv = sk + size_t(n) * rb;
    // The whole step is planned here and moved by two launches (a first
    // version moved each row with its own copy and uploaded each state
    // alone: ~5 small operations per sequence): `out` gathers the rows bound
    // for the pages (the ring's oldest, or the new token itself without a
    // window) into staging, in run order; `in` puts the new rows in their
    // slots and writes the states, on the device only if nothing was
    // refused (the f16 rounding, the append), so a refusal leaves every
    // sequence as it was. One status readback for the whole call.
    std::vector<DenseRowCopy> out, in;
    std::vector<int> states;
    std::vector<std::pair<int, int>> runs;
    std::vector<DenseSeq> next(n);
    for (int i = 0; i < n; ++i) {
      const int s = seqs[i];
      DenseSeq ds = dense[s];
      const uint8_t* nk = k16 + size_t(i) * rb;
      const uint8_t* nv = v16 + size_t(i) * rb;
      if (ds.n_pre >= S && ds.win_count >= W) {  // something leaves for the pages
        const size_t at = runs.size() * rb;
        if (W > 0)
          out.push_back({dense_row(dense_k, s, S + ds.win_start), dense_row(dense_v, s, S + ds.win_start),
                         sk + at, sv + at});
        else
          out.push_back({nk, nv, sk + at, sv + at});
        runs.emplace_back(s, 1);
      }
      int slot = -1;
      if (ds.n_pre < S) {
        slot = ds.n_pre++;
      } else if (W > 0) {
        if (ds.win_count < W) {
          slot = S + (ds.win_start + ds.win_count) % W;
          ++ds.win_count;
        } else {  // the oldest went to the pages above; the new token takes its slot
          slot = S + ds.win_start;
          ds.win_start = (ds.win_start + 1) % W;
        }
      }
      // No destination when nothing stays dense (W == 0, prefix full): the
      // entry still carries the state.
      if (slot >= 0)
        in.push_back({nk, nv, dense_row(dense_k, s, slot), dense_row(dense_v, s, slot)});
      else
        in.push_back({nk, nv, nullptr, nullptr});
      states.insert(states.end(), {s, ds.n_pre, ds.win_start, ds.win_count});
      next[i] = ds;
    }
    // One upload: [out copies][in copies][states].
    const size_t cb = sizeof(DenseRowCopy), bytes = (out.size() + in.size()) * cb + states.size() * sizeof(int);
    std::vector<uint8_t> plan(bytes);
    std::memcpy(plan.data(), out.data(), out.size() * cb);
    std::memcpy(plan.data() + out.size() * cb, in.data(), in.size() * cb);
    std::memcpy(plan.data() + (out.size() + in.size()) * cb, states.data(), states.size() * sizeof(int));
    ensure(upload_dense, bytes);
    TQ_CUDA_CHECK(cudaMemcpyAsync(upload_dense.data(), plan.data(), bytes, cudaMemcpyHostToDevice, stream));
    const auto* dev_copies = upload_dense.as<DenseRowCopy>();
    const auto* dev_states = reinterpret_cast<const int*>(upload_dense.as<uint8_t>() + (out.size() + in.size()) * cb);
    launch_dense_row_copies(dev_copies, int(out.size()), rb, nullptr, nullptr, nullptr, nullptr, stream);
    // The append reads the staging rows in the same order (row = position in
    // runs); the rounding's flags keep its lengths uncommitted too, and the
    // rows and states go in only if the final status is clean. One readback.
    RunsInFlight f;
    try {
      f = enqueue_runs(runs, sk, sv, DType::f16, stream, f16_status, async ? sticky.as<int>() : nullptr);
    } catch (...) {  // refused on the host: let the enqueued scratch work finish before the caller goes on
      (void)cudaStreamSynchronize(stream);
      throw;
    }
    const int* final_status = f.status != nullptr ? f.status : f16_status;
    int st = 0;
    try {
      launch_dense_row_copies(dev_copies + out.size(), int(in.size()), rb, dev_states, dense_state.as<int>(),
                              final_status, async ? sticky.as<int>() : nullptr, stream);
      if (!async || f.calibrated_now) st = read_status(final_status, stream);
    } catch (...) {
      rollback(f);
      throw;
    }
    if (async) {  // the error word keeps a refusal for check_appends; only the channel choice is undone now
      if (f.calibrated_now && (st & (kStatusNonFinite | kStatusDenseOverflow))) uncalibrate();
      st = 0;
    }
    if (st & (kStatusNonFinite | kStatusDenseOverflow)) {  // the dense rows' wording
      rollback(f);
      check_dense_status(st);
    }
    if (f.status != nullptr) finish_runs(f, st);  // a scale overflow throws (pages given back)
    for (int i = 0; i < n; ++i) {
      dense[seqs[i]] = next[i];
      state_host[3 * seqs[i]] = next[i].n_pre;
      state_host[3 * seqs[i] + 1] = next[i].win_start;
      state_host[3 * seqs[i] + 2] = next[i].win_count;
    }
  }
};

GpuKvLayer::GpuKvLayer(const Quantizer& kq, const Quantizer& vq, const GpuKvLayerConfig& cfg)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  TQ_REQUIRE(cuda_available(), "GPU KV layer: no CUDA device");
  TQ_REQUIRE(cfg.n_heads_kv >= 1, "GPU KV layer: n_heads_kv must be >= 1, got ", cfg.n_heads_kv);
  TQ_REQUIRE(cfg.page_tokens >= 1 && cfg.page_tokens <= 65535,
             "GPU KV layer: page_tokens must be in 1..65535, got ", cfg.page_tokens);
  TQ_REQUIRE(cfg.n_heads_kv <= 65535, "GPU KV layer: n_heads_kv must be <= 65535, got ",
             cfg.n_heads_kv);
  TQ_REQUIRE(cfg.max_seqs >= 1, "GPU KV layer: max_seqs must be >= 1, got ", cfg.max_seqs);
  TQ_REQUIRE(cfg.max_pages_per_seq >= 1, "GPU KV layer: max_pages_per_seq must be >= 1, got ",
             cfg.max_pages_per_seq);
  TQ_REQUIRE(cfg.split_pages >= 1, "GPU KV layer: split_pages must be >= 1, got ", cfg.split_pages);
  TQ_REQUIRE(kq.dim() == vq.dim(), "GPU KV layer: K dim ", kq.dim(), " != V dim ", vq.dim());
  TQ_REQUIRE(cfg.dense_window >= 0 && cfg.dense_prefix >= 0, "GPU KV layer: dense_window ",
             cfg.dense_window, " and dense_prefix ", cfg.dense_prefix, " must be >= 0");
  TQ_REQUIRE(cfg.sliding_window >= 0, "GPU KV layer: sliding_window must be >= 0 (0: keeps every token), got ",
             cfg.sliding_window);
  TQ_REQUIRE((cfg.dense_window == 0 && cfg.dense_prefix == 0) || cfg.round_to == DType::f16,
             "GPU KV layer: dense_window / dense_prefix hold f16 tokens and need round_to f16 (got ",
             to_string(cfg.round_to), ")");
  if (m.cfg.max_pages <= 0) m.cfg.max_pages = cfg.max_seqs * cfg.max_pages_per_seq;
  m.hk = host_format(kq, "K", cfg.n_heads_kv, cfg.k_hi_channels);
  m.hv = host_format(vq, "V", cfg.n_heads_kv, cfg.v_hi_channels);
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
  if (!m.hk.split) m.ka = append_format(m.kf, m.hk.signs, m.hk.boundaries);
  if (!m.hv.split) m.va = append_format(m.vf, m.hv.signs, m.hv.boundaries);
  m.ksf = upload_split(m.hk, m.k_split_consts);
  m.vsf = upload_split(m.hv, m.v_split_consts);
  m.ks_search = split_search(m.hk);
  m.vs_search = split_search(m.hv);
  m.k_auto = m.hk.split && cfg.k_hi_channels.empty();
  m.v_auto = m.hv.split && cfg.v_hi_channels.empty();
  m.k_default_channels = m.hk.channels;
  m.v_default_channels = m.hv.channels;

  m.pool = DeviceBuffer(size_t(m.cfg.max_pages) * m.page_bytes);
  // Zeroed once: slots no token has reached yet still hold finite records,
  // which the decode kernel relies on (a dead slot's weight is 0 * scale).
  TQ_CUDA_CHECK(cudaMemset(m.pool.data(), 0, m.pool.size()));
  m.page_table = DeviceBuffer(size_t(cfg.max_seqs) * cfg.max_pages_per_seq * sizeof(int));
  TQ_CUDA_CHECK(cudaMemset(m.page_table.data(), 0, m.page_table.size()));
  m.lengths = DeviceBuffer(size_t(cfg.max_seqs) * sizeof(int));
  TQ_CUDA_CHECK(cudaMemset(m.lengths.data(), 0, m.lengths.size()));
  m.sticky = DeviceBuffer(sizeof(int));
  TQ_CUDA_CHECK(cudaMemset(m.sticky.data(), 0, sizeof(int)));
  for (int p = m.cfg.max_pages - 1; p >= 0; --p) m.free_pages.push_back(p);
  if (m.has_dense()) {
    const size_t bytes = size_t(cfg.max_seqs) * m.dense_slots() * m.dense_row_bytes();
    m.dense_k = DeviceBuffer(bytes);
    m.dense_v = DeviceBuffer(bytes);
    m.dense_state = DeviceBuffer(size_t(cfg.max_seqs) * 3 * sizeof(int));
    TQ_CUDA_CHECK(cudaMemset(m.dense_state.data(), 0, m.dense_state.size()));
    m.state_host.assign(size_t(cfg.max_seqs) * 3, 0);
  }
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
  m.first_page.push_back(0);
  m.pages.emplace_back();
  m.dense.emplace_back();
  return static_cast<int>(m.len.size()) - 1;
}

int GpuKvLayer::n_tokens(int seq) const {
  impl_->check_seq(seq);
  const Impl::DenseSeq& d = impl_->dense[seq];
  return d.n_pre + impl_->len[seq] + d.win_count;
}
int GpuKvLayer::n_pages(int seq) const {
  impl_->check_seq(seq);
  const int P = impl_->cfg.page_tokens;
  return (impl_->len[seq] + P - 1) / P;  // reserve_steps may have given it more
}
int GpuKvLayer::first_record(int seq) const {
  impl_->settle();  // frees what the confirmed lengths allow
  const Impl& m = *impl_;
  m.check_seq(seq);
  return m.dense[seq].n_pre + m.first_page[seq] * m.cfg.page_tokens;
}

void GpuKvLayer::append(int seq, const float* k, const float* v, int n_tokens) {
  append(seq, static_cast<const void*>(k), static_cast<const void*>(v), n_tokens, DType::f32);
}

void GpuKvLayer::append(int seq, const void* k, const void* v, int n_tokens, DType dtype) {
  Impl& m = *impl_;
  m.settle();
  m.check_seq(seq);
  TQ_REQUIRE(n_tokens >= 0, "GPU KV layer: append of ", n_tokens, " tokens");
  const size_t n = size_t(n_tokens) * m.cfg.n_heads_kv * m.hk.dim * dtype_bytes(dtype);
  if (n == 0) return;
  TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: append of ", n_tokens, " tokens from a null pointer");
  if (m.has_dense()) return m.append_dense(seq, k, v, n_tokens, dtype, true, nullptr);
  m.ensure(m.staging, 2 * n);  // cudaMalloc'd: aligned, so append_runs does not copy it again
  uint8_t* d = m.staging.as<uint8_t>();
  TQ_CUDA_CHECK(cudaMemcpy(d, k, n, cudaMemcpyHostToDevice));
  TQ_CUDA_CHECK(cudaMemcpy(d + n, v, n, cudaMemcpyHostToDevice));
  m.append_runs({{seq, n_tokens}}, d, d + n, dtype, nullptr);
}

void GpuKvLayer::append_device(int seq, const float* k, const float* v, int n_tokens,
                               Stream stream) {
  append_device(seq, static_cast<const void*>(k), static_cast<const void*>(v), n_tokens, DType::f32, stream);
}

void GpuKvLayer::append_device(int seq, const void* k, const void* v, int n_tokens, DType dtype,
                               Stream stream) {
  Impl& m = *impl_;
  m.settle();
  if (m.has_dense()) {
    m.check_seq(seq);
    TQ_REQUIRE(n_tokens >= 0, "GPU KV layer: append of ", n_tokens, " tokens");
    if (n_tokens == 0) return;
    TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: append of ", n_tokens, " tokens from a null pointer");
    return m.append_dense(seq, k, v, n_tokens, dtype, false, stream);
  }
  m.append_runs({{seq, n_tokens}}, k, v, dtype, stream);
}

void GpuKvLayer::append_batch_device(const int* seqs, int n, const float* k, const float* v,
                                     Stream stream) {
  append_batch_device(seqs, n, static_cast<const void*>(k), static_cast<const void*>(v),
                      DType::f32, stream);
}

// The (sequence, 1) runs of a batch of decode tokens, validated.
static std::vector<std::pair<int, int>> batch_runs(const GpuKvLayer::Impl& m, const int* seqs, int n,
                                                   const void* k, const void* v) {
  TQ_REQUIRE(n >= 0, "GPU KV layer: batch of ", n, " sequences");
  std::vector<std::pair<int, int>> runs;
  std::vector<char> seen(m.len.size(), 0);
  for (int i = 0; i < n; ++i) {
    m.check_seq(seqs[i]);
    TQ_REQUIRE(!seen[seqs[i]], "GPU KV layer: sequence ", seqs[i], " appears twice in a batch");
    seen[seqs[i]] = 1;
    runs.emplace_back(seqs[i], 1);
  }
  TQ_REQUIRE(n == 0 || (k != nullptr && v != nullptr), "GPU KV layer: batch append from a null pointer");
  return runs;
}

void GpuKvLayer::append_batch_device(const int* seqs, int n, const void* k, const void* v,
                                     DType dtype, Stream stream) {
  Impl& m = *impl_;
  m.settle();
  const auto runs = batch_runs(m, seqs, n, k, v);
  if (m.has_dense()) {
    if (n == 0) return;
    return m.append_batch_dense(seqs, n, k, v, dtype, stream, false);
  }
  m.append_runs(runs, k, v, dtype, stream);
}

void GpuKvLayer::append_batch_device_async(const int* seqs, int n, const float* k, const float* v,
                                           Stream stream) {
  append_batch_device_async(seqs, n, static_cast<const void*>(k), static_cast<const void*>(v),
                            DType::f32, stream);
}

void GpuKvLayer::append_batch_device_async(const int* seqs, int n, const void* k, const void* v,
                                           DType dtype, Stream stream) {
  Impl& m = *impl_;
  const auto runs = batch_runs(m, seqs, n, k, v);
  if (n == 0) return;
  m.append_async(runs, seqs, n, k, v, dtype, stream);
}

void GpuKvLayer::check_appends() { impl_->settle(); }

void GpuKvLayer::reserve_steps(const int* seqs, int n, int steps) {
  Impl& m = *impl_;
  m.settle();
  TQ_REQUIRE(!m.needs_calibration(), "GPU KV layer: reserve_steps before the channel split's hi channels are "
             "chosen: append the first tokens (prefill) first, or give k_hi_channels / v_hi_channels");
  TQ_REQUIRE(n >= 1, "GPU KV layer: reserve_steps for a batch of ", n, " sequences");
  TQ_REQUIRE(seqs != nullptr, "GPU KV layer: reserve_steps from a null sequence list");
  TQ_REQUIRE(steps >= 1, "GPU KV layer: reserve_steps of ", steps, " steps (at least 1)");
  const int P = m.cfg.page_tokens;
  std::vector<char> seen(m.len.size(), 0);
  size_t need_new = 0;
  for (int i = 0; i < n; ++i) {
    const int s = seqs[i];
    m.check_seq(s);
    TQ_REQUIRE(!seen[s], "GPU KV layer: sequence ", s, " appears twice in the batch of reserve_steps");
    seen[s] = 1;
    const long want = long(m.len[s]) + steps, cap = long(m.cfg.max_pages_per_seq) * P;
    TQ_REQUIRE(want <= cap, "GPU KV layer: sequence ", s, " would hold ", want, " tokens after ", steps,
               " steps, over its capacity of ", cap, " (max_pages_per_seq * page_tokens)");
    const size_t pages = size_t((want + P - 1) / P);
    if (pages > m.pages[s].size()) need_new += pages - m.pages[s].size();
  }
  TQ_REQUIRE(need_new <= m.free_pages.size(), "GPU KV layer: page pool exhausted (", need_new,
             " pages needed for ", steps, " steps, ", m.free_pages.size(), " free)");
  // Device buffers first (allocation can fail: nothing has changed yet).
  const int hpt = m.step_heads_per_tile_max();
  const int tiles = n * ((m.cfg.n_heads_kv + hpt - 1) / hpt);
  if (m.step_limits.size() == 0) {
    TQ_CUDA_CHECK(cudaStreamCreateWithFlags(&m.step_side, cudaStreamNonBlocking));
    TQ_CUDA_CHECK(cudaEventCreateWithFlags(&m.step_fork, cudaEventDisableTiming));
    TQ_CUDA_CHECK(cudaEventCreateWithFlags(&m.step_join, cudaEventDisableTiming));
    m.step_buf = DeviceBuffer(16 + size_t(m.cfg.max_seqs) * sizeof(int));
    TQ_CUDA_CHECK(cudaMemset(m.step_buf.data(), 0, 16));  // status, done: each step's commit leaves them 0
    m.step_limits = DeviceBuffer(size_t(m.cfg.max_seqs) * sizeof(int));
    m.step_limit_host.assign(m.cfg.max_seqs, 0);
  }
  if (m.has_dense() && m.step_dense.size() == 0) m.step_dense = DeviceBuffer(m.step_dense_bytes());
  for (int i = 0; i < n; ++i) {
    const int s = seqs[i];
    const size_t want = (size_t(m.len[s]) + steps + P - 1) / P;
    while (m.pages[s].size() < want) {
      m.pages[s].push_back(m.free_pages.back());
      m.free_pages.pop_back();
    }
    // From the first page kept on: entries of freed pages keep their old ids (see evict).
    const size_t f = size_t(m.first_page[s]);
    TQ_CUDA_CHECK(cudaMemcpy(m.page_table.as<int>() + size_t(s) * m.cfg.max_pages_per_seq + f,
                             m.pages[s].data() + f, (m.pages[s].size() - f) * sizeof(int),
                             cudaMemcpyHostToDevice));
  }
  // Only this batch may step, each up to its limit.
  for (size_t s = 0; s < m.step_limit_host.size(); ++s) m.step_limit_host[s] = 0;
  for (int i = 0; i < n; ++i) m.step_limit_host[seqs[i]] = m.len[seqs[i]] + steps;
  TQ_CUDA_CHECK(cudaMemcpy(m.step_limits.data(), m.step_limit_host.data(), m.step_limit_host.size() * sizeof(int),
                           cudaMemcpyHostToDevice));
  m.step_n = n;
  m.step_tiles = tiles;
  m.step_heads_per_tile = hpt;
  TQ_CUDA_CHECK(cudaMemcpy(m.step_seqs(), seqs, size_t(n) * sizeof(int), cudaMemcpyHostToDevice));
}

void GpuKvLayer::append_step_device(const void* k, const void* v, DType dtype, Stream stream) {
  Impl& m = *impl_;
  TQ_REQUIRE(m.step_n > 0, "GPU KV layer: append_step_device without a batch: call reserve_steps first "
             "(outside the capture)");
  TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: append_step_device from a null pointer");
  TQ_REQUIRE((reinterpret_cast<uintptr_t>(k) & 15) == 0 && (reinterpret_cast<uintptr_t>(v) & 15) == 0,
             "GPU KV layer: append_step_device needs 16-byte aligned k and v (got ", k, ", ", v, ")");
  TQ_REQUIRE(!m.async_unchecked, "GPU KV layer: append_step_device after asynchronous appends not yet checked: "
             "call check_appends() first (outside the capture)");
  AppendStepTiles st;
  st.seqs = m.step_seqs();
  st.n = m.step_n;
  st.done = m.step_done();
  st.sticky = m.sticky.as<int>();
  st.heads_per_tile = m.step_heads_per_tile;
  st.tiles_per_seq = m.step_tiles / m.step_n;
  st.n_heads = m.cfg.n_heads_kv;
  st.lengths = m.lengths.as<int>();
  st.limits = m.step_limits.as<int>();
  st.page_table = m.page_table.as<int>();
  st.max_pages_per_seq = m.cfg.max_pages_per_seq;
  st.page_tokens = m.cfg.page_tokens;
  const void* xk = k;
  const void* xv = v;
  DType xtype = dtype;
  Impl::StepDense sd{};
  // The step kernel (a warp per vector, or per half of a two-halves split)
  // where it serves both formats; the tile kernels otherwise.
  const Impl::StepPath path = m.step_path();
  const bool mse = path == Impl::StepPath::mse, outk = path == Impl::StepPath::outlier_k;
  const bool kernel = path != Impl::StepPath::tiles;
  DenseStepRows rows;  // the step kernel plans the dense rows itself
  if (m.has_dense()) {
    sd = m.step_dense_parts();
    rows.dense_k = m.dense_k.as<uint8_t>();
    rows.dense_v = m.dense_v.as<uint8_t>();
    rows.state = m.dense_state.as<int>();
    rows.prefix_slots = m.cfg.dense_prefix;
    rows.window_slots = m.cfg.dense_window;
    rows.active = sd.active;
    st.active = sd.active;
  }
  if (m.has_dense() && !kernel) {  // the rows leaving the dense tokens are the tile kernels' input (f16)
    DenseStepPlan dp;
    dp.seqs = st.seqs;
    dp.n = st.n;
    dp.k = k;
    dp.v = v;
    dp.dtype = dtype;
    dp.row_elems = size_t(m.cfg.n_heads_kv) * m.hk.dim;
    dp.rows = rows;
    dp.new_k = sd.new_k;
    dp.new_v = sd.new_v;
    dp.page_k = sd.page_k;
    dp.page_v = sd.page_v;
    dp.copies = sd.copies;
    dp.states = sd.states;
    dp.status = m.step_status();  // the f16 rounding's refusals keep the step uncommitted
    launch_dense_step_plan(dp, stream);
    xk = sd.page_k;
    xv = sd.page_v;
    xtype = DType::f16;
  }
  if (kernel) {
    // K and V in one launch (src/cuda/mse_step.cu).
    StepLaunch a;
    a.step = st;
    a.k = xk;
    a.v = xv;
    a.dtype = xtype;
    a.round_to = m.cfg.round_to;
    a.n_heads = m.cfg.n_heads_kv;
    a.k_region = m.region(false);
    a.v_region_offset = m.region(true).region_offset;
    a.status = m.step_status();
    a.dense = m.has_dense() ? &rows : nullptr;
    if (mse) launch_mse_step(a, m.ka, m.va, stream);
    else if (outk) launch_outlier_step(a, m.hk.dim, m.ksf, m.hk.record_bytes, m.va, stream);
    else launch_split_step(a, m.hk.dim, m.ksf, m.vsf, m.ks_search, m.vs_search, m.hk.record_bytes,
                           m.hv.record_bytes, stream);
  } else {  // the tile kernels, V beside K
    TQ_CUDA_CHECK(cudaEventRecord(m.step_fork, stream));
    TQ_CUDA_CHECK(cudaStreamWaitEvent(m.step_side, m.step_fork, 0));
    m.launch_kernels(xk, xv, xtype, nullptr, m.step_tiles, m.step_status(), stream, m.step_side, &st);
    TQ_CUDA_CHECK(cudaEventRecord(m.step_join, m.step_side));
    TQ_CUDA_CHECK(cudaStreamWaitEvent(stream, m.step_join, 0));
  }
  // (the block that finished the step's last vector or tile committed it)
  // The new rows into their slots and the states, only if the commit took
  // the step (a refusal is in the error word by then).
  if (m.has_dense() && kernel)
    launch_dense_step_finish(st, k, v, dtype, m.cfg.n_heads_kv, m.hk.dim, rows, stream);
  else if (m.has_dense())
    launch_dense_row_copies(sd.copies, m.step_n, m.dense_row_bytes(), sd.states, m.dense_state.as<int>(),
                            nullptr, m.sticky.as<int>(), stream);
  m.steps_captured = true;
}

std::string GpuKvLayer::step_kernel() const {
  switch (impl_->step_path()) {
    case Impl::StepPath::mse: return "step kernel: tq-mse K and V";
    case Impl::StepPath::halves: return "step kernel: two-halves splits";
    case Impl::StepPath::outlier_k: return "step kernel: outlier channels in K, tq-mse V";
    case Impl::StepPath::tiles: break;
  }
  return "tile kernels: no step kernel for these K / V formats (search modes, dims or split kinds differ)";
}

std::vector<int> GpuKvLayer::hi_channels(int head, bool key) const {
  const Impl& m = *impl_;
  TQ_REQUIRE(head >= 0 && head < m.cfg.n_heads_kv, "GPU KV layer: head ", head, " out of range (",
             m.cfg.n_heads_kv, " KV heads)");
  const HostFormat& f = key ? m.hk : m.hv;
  if (!f.split || ((key ? m.k_auto : m.v_auto) && !m.calibrated)) return {};
  const auto first = f.channels.begin() + size_t(head) * f.dim;
  return std::vector<int>(first, first + f.seg[0].dim);
}

void GpuKvLayer::download_page(int seq, int page, uint8_t* out) const {
  impl_->settle();  // the host's page list must be the device's
  const Impl& m = *impl_;
  m.check_seq(seq);
  const int held = n_pages(seq);
  TQ_REQUIRE(page >= 0 && page < held, "GPU KV layer: page ", page, " of sequence ", seq, " does not exist (",
             held, " pages)");
  TQ_REQUIRE(page >= m.first_page[seq], "GPU KV layer: page ", page, " of sequence ", seq,
             " was freed by the sliding window (sliding_window ", m.cfg.sliding_window, "; pages from ",
             m.first_page[seq], " on are kept)");
  TQ_CUDA_CHECK(cudaMemcpy(out, m.pool.as<uint8_t>() + size_t(m.pages[seq][page]) * m.page_bytes,
                           m.page_bytes, cudaMemcpyDeviceToHost));
}

// Records <-> pages: per (page, head), a run of consecutive slots is one
// contiguous range of the page's K (or V) region; the host side is
// token-major [n, heads, record]. Host = const uint8_t*: host -> pool;
// uint8_t*: pool -> host.
template <class Host>
static void copy_record_runs(const GpuKvLayer::Impl& m, int seq, int t0, int n, Host k, Host v) {
  constexpr bool to_device = std::is_const_v<std::remove_pointer_t<Host>>;
  const int P = m.cfg.page_tokens, H = m.cfg.n_heads_kv;
  std::vector<uint8_t> run;
  for (int t = 0; t < n;) {
    const int pos = t0 + t, slot = pos % P, take = std::min(n - t, P - slot);
    uint8_t* page = m.pool.as<uint8_t>() + size_t(m.pages[seq][pos / P]) * m.page_bytes;
    for (int key = 1; key >= 0; --key) {
      const size_t rb = key ? m.hk.record_bytes : m.hv.record_bytes;
      Host host = key ? k : v;
      uint8_t* region = page + (key ? 0 : size_t(P) * H * m.hk.record_bytes);
      run.resize(size_t(take) * rb);
      for (int h = 0; h < H; ++h) {
        uint8_t* dev = region + (size_t(h) * P + slot) * rb;
        if constexpr (to_device) {
          for (int i = 0; i < take; ++i)
            std::memcpy(&run[size_t(i) * rb], host + (size_t(t + i) * H + h) * rb, rb);
          TQ_CUDA_CHECK(cudaMemcpy(dev, run.data(), run.size(), cudaMemcpyHostToDevice));
        } else {
          TQ_CUDA_CHECK(cudaMemcpy(run.data(), dev, run.size(), cudaMemcpyDeviceToHost));
          for (int i = 0; i < take; ++i)
            std::memcpy(host + (size_t(t + i) * H + h) * rb, &run[size_t(i) * rb], rb);
        }
      }
    }
    t += take;
  }
}

// A record decodes to finite values iff its scale is finite (any code is valid).
static bool scale_finite(const uint8_t* p, bool f32) {
  if (f32) {
    float x;
    std::memcpy(&x, p, sizeof x);
    return std::isfinite(x);
  }
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return (h & 0x7c00u) != 0x7c00u;  // exponent all ones: inf or NaN
}
static bool record_scale_finite(const uint8_t* rec, const HostFormat& f) {
  if (f.split)  // both sub-records' scales
    return scale_finite(rec + f.seg[0].offset + f.seg[0].code_bytes, f.seg[0].scale_f32) &&
           scale_finite(rec + f.seg[1].offset + f.seg[1].code_bytes, f.seg[1].scale_f32);
  return scale_finite(rec + f.code_bytes, f.scale_f32);
}

void GpuKvLayer::append_records(int seq, const uint8_t* k, const uint8_t* v, int n) {
  Impl& m = *impl_;
  m.settle();
  m.check_seq(seq);
  TQ_REQUIRE(n >= 0, "GPU KV layer: append_records of ", n, " tokens");
  if (n == 0) return;
  TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: append_records from a null pointer");
  m.require_no_dense("append_records");
  // Records carry no channel choice: a split layer must have been told the
  // channels they were written with.
  TQ_REQUIRE(!m.k_auto && !m.v_auto, "GPU KV layer: append_records into a layer with a channel-split ",
             m.k_auto ? "K" : "V", " format whose hi channels were not given: set GpuKvLayerConfig::",
             m.k_auto ? "k_hi_channels" : "v_hi_channels",
             " to the channels the records were written with (e.g. KvCache::outlier_channels)");
  const int P = m.cfg.page_tokens, H = m.cfg.n_heads_kv;
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h) {
      TQ_REQUIRE(record_scale_finite(k + (size_t(t) * H + h) * m.hk.record_bytes, m.hk),
                 "GPU KV layer: append_records: the K record of token ", t, " head ", h,
                 " has a non-finite scale (refused; the sequence is unchanged)");
      TQ_REQUIRE(record_scale_finite(v + (size_t(t) * H + h) * m.hv.record_bytes, m.hv),
                 "GPU KV layer: append_records: the V record of token ", t, " head ", h,
                 " has a non-finite scale (refused; the sequence is unchanged)");
    }
  const int need = (m.len[seq] + n + P - 1) / P;
  TQ_REQUIRE(need <= m.cfg.max_pages_per_seq, "GPU KV layer: sequence ", seq, " would hold ",
             m.len[seq] + n, " tokens, over its capacity of ", m.cfg.max_pages_per_seq * P,
             " (max_pages_per_seq * page_tokens)");
  const size_t old = m.pages[seq].size();
  const size_t more = size_t(need) > old ? size_t(need) - old : 0;  // (reserve_steps: already there)
  TQ_REQUIRE(more <= m.free_pages.size(), "GPU KV layer: page pool exhausted (", more, " pages needed, ",
             m.free_pages.size(), " free)");
  try {
    while (m.pages[seq].size() < size_t(need)) {
      m.pages[seq].push_back(m.free_pages.back());
      m.free_pages.pop_back();
    }
    copy_record_runs(m, seq, m.len[seq], n, k, v);
    if (m.pages[seq].size() > old)
      TQ_CUDA_CHECK(cudaMemcpy(m.page_table.as<int>() + size_t(seq) * m.cfg.max_pages_per_seq + old,
                               m.pages[seq].data() + old, (m.pages[seq].size() - old) * sizeof(int),
                               cudaMemcpyHostToDevice));
    const int len = m.len[seq] + n;
    TQ_CUDA_CHECK(cudaMemcpy(m.lengths.as<int>() + seq, &len, sizeof(int), cudaMemcpyHostToDevice));
    m.len[seq] = len;
  } catch (...) {  // slots past len are unspecified: only the pages go back
    while (m.pages[seq].size() > old) {
      m.free_pages.push_back(m.pages[seq].back());
      m.pages[seq].pop_back();
    }
    throw;
  }
}

void GpuKvLayer::read_records(int seq, int t0, int n, uint8_t* k, uint8_t* v) const {
  impl_->settle();  // the host's lengths must be the device's
  const Impl& m = *impl_;
  m.check_seq(seq);
  // Token positions: the pages hold n_pre .. n_pre + len - 1.
  const int n_pre = m.dense[seq].n_pre;
  TQ_REQUIRE(t0 >= n_pre && n >= 0 && int64_t(t0) + n <= int64_t(n_pre) + m.len[seq],
             "GPU KV layer: read_records of tokens [", t0, ", ", int64_t(t0) + n, ") of sequence ", seq,
             ", whose compressed tokens are [", n_pre, ", ", n_pre + m.len[seq], ")");
  if (n == 0) return;
  TQ_REQUIRE(k != nullptr && v != nullptr, "GPU KV layer: read_records into a null pointer");
  const int first = n_pre + m.first_page[seq] * m.cfg.page_tokens;
  TQ_REQUIRE(t0 >= first, "GPU KV layer: read_records of tokens [", t0, ", ", int64_t(t0) + n, ") of sequence ",
             seq, ": the sliding window (sliding_window ", m.cfg.sliding_window, ") freed the records before ",
             first);
  copy_record_runs(m, seq, t0 - n_pre, n, k, v);
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
  // + the dense tokens' splits: [max_seqs, n_heads_q, dense splits] outputs and lse.
  const int parts =
      n_splits + decode_dense_part_splits(m.hk.dim, m.cfg.dense_prefix + m.cfg.dense_window);
  // + a 16-bit query widened to f32 (DecodeAttentionParams::q_f32), + the
  // device plan's words (DecodeAttentionParams::device_plan) at the end.
  return size_t(m.cfg.max_seqs) * n_heads_q * (parts * (m.hk.dim + 1) + m.hk.dim) * sizeof(float) +
         kDevicePlanBytes;
}

std::string GpuKvLayer::attend_kernel(int n_heads_q) const {
  const Impl& m = *impl_;
  TQ_REQUIRE(n_heads_q >= m.cfg.n_heads_kv && n_heads_q % m.cfg.n_heads_kv == 0, "GPU attend: n_heads_q ",
             n_heads_q, " is not a multiple of n_heads_kv ", m.cfg.n_heads_kv);
  const DecodeShape s = decode_shape(layer_params(m, m.pool, n_heads_q));
  if (decode_kernel_for(s) == DecodeKernel::tensor_core) return "tensor_core";
  const char* why = decode_tc_unsupported(s);
  return std::string("reference: ") + (why != nullptr ? why : "chosen by set_decode_kernel_override");
}

void GpuKvLayer::attend(const float* q, int n_heads_q, const AttentionParams& params, float* out,
                        float* lse, void* workspace, size_t ws_bytes, Stream stream) const {
  attend(q, DType::f32, n_heads_q, params, out, DType::f32, lse, workspace, ws_bytes, stream);
}

void GpuKvLayer::attend(const void* q, DType q_dtype, int n_heads_q, const AttentionParams& params, void* out,
                        DType out_dtype, float* lse, void* workspace, size_t ws_bytes, Stream stream) const {
  const Impl& m = *impl_;
  for (const auto& [what, t] : {std::pair{"q_dtype", q_dtype}, std::pair{"out_dtype", out_dtype}})
    TQ_REQUIRE(t == DType::f32 || t == DType::f16 || t == DType::bf16, "GPU attend: ", what, " ", int(t),
               " is not f32, f16 or bf16");
  const int H = m.cfg.n_heads_kv, D = m.hk.dim;
  TQ_REQUIRE(n_heads_q >= H && n_heads_q % H == 0, "GPU attend: n_heads_q ", n_heads_q,
             " is not a multiple of n_heads_kv ", H);
  const int g = n_heads_q / H;
  TQ_REQUIRE(g * D <= 16384, "GPU attend: GQA group of ", g, " heads at head_dim ", D,
             " exceeds the kernel's shared memory (group * head_dim <= 16384)");
  TQ_REQUIRE(ws_bytes >= workspace_bytes(n_heads_q), "GPU attend: workspace of ", ws_bytes,
             " bytes, need ", workspace_bytes(n_heads_q));
  TQ_REQUIRE(m.cfg.sliding_window == 0 || (params.window > 0 && params.window <= m.cfg.sliding_window &&
                                           params.n_sinks == 0),
             "GPU attend: this layer has sliding_window ", m.cfg.sliding_window,
             " and frees the tokens before it: attend it with 0 < window <= ", m.cfg.sliding_window,
             " and no sinks (got window ", params.window, ", n_sinks ", params.n_sinks, ")");
  // (The merge reads a split V's channel table, and the kernel a split K's:
  // neither exists before the first append chooses them.)
  TQ_REQUIRE(!m.needs_calibration(), "GPU attend: the channel split's hi channels are not chosen yet (the first "
             "append chooses them from its tokens): append first, or give k_hi_channels / v_hi_channels");
  DecodeAttentionParams p = layer_params(m, m.pool, n_heads_q);
  p.n_seqs = n_seqs();
  p.sm_scale = params.scale > 0 ? params.scale : 1.0f / std::sqrt(static_cast<float>(D));
  p.softcap = params.softcap;
  p.window = params.window;
  p.n_sinks = params.n_sinks;
  p.q_dtype = int(q_dtype);
  p.out_dtype = int(out_dtype);
  if (m.has_dense()) {  // page indices: the query is window_tail past the pages, the sinks after the prefix
    p.window_tail = m.cfg.dense_window;
    p.n_sinks = std::max(0, params.n_sinks - m.cfg.dense_prefix);
    p.dense.prefix_slots = m.cfg.dense_prefix;  // (the plan needs to know there are dense tokens)
    p.dense.window_slots = m.cfg.dense_window;
  }
  // Picks the kernel (tensor cores where supported, else the reference: see
  // kernels.hpp) and its splits (with a window, over the window only); the
  // partials below use the planned count. Under stream capture the
  // tensor-core kernel plans its splits on the device at each replay
  // (SplitPlanning): the host's lengths are those of the capture.
  if (plans_on_device(stream))
    p.device_plan = reinterpret_cast<int*>(static_cast<char*>(workspace) + workspace_bytes(n_heads_q) - kDevicePlanBytes);
  plan_decode_attention(p, m.len.data());
  float* part_o = static_cast<float*>(workspace);
  float* part_lse = part_o + size_t(m.cfg.max_seqs) * n_heads_q * p.n_splits * D;
  if (m.has_dense()) {
    // The dense tokens have their own small kernel (launched with the page
    // kernel's), the pages hold the positions after the prefix and end a
    // full window before the query (a sequence with pages has a full prefix
    // and window: the layer has no trim); the merge joins both.
    DenseTokens& dt = p.dense;
    dt.k = m.dense_k.as<uint16_t>();
    dt.v = m.dense_v.as<uint16_t>();
    dt.state = m.dense_state.as<int>();
    dt.prefix_slots = m.cfg.dense_prefix;
    dt.window_slots = m.cfg.dense_window;
    dt.sinks = params.n_sinks;
    p.dense_splits = decode_dense_part_splits(D, dt.prefix_slots + dt.window_slots);
    p.dense_o = part_lse + size_t(m.cfg.max_seqs) * n_heads_q * p.n_splits;
    p.dense_lse = p.dense_o + size_t(m.cfg.max_seqs) * n_heads_q * p.dense_splits * D;
  }
  p.q_f32 = reinterpret_cast<float*>(static_cast<char*>(workspace) + workspace_bytes(n_heads_q) - kDevicePlanBytes) -
            size_t(m.cfg.max_seqs) * n_heads_q * D;
  launch_decode_attention(p, q, part_o, part_lse, out, lse, stream);
}

static DecodeAttentionParams layer_params(const GpuKvLayer::Impl& m, const DeviceBuffer& pool,
                                          int n_heads_q) {
  DecodeAttentionParams p;
  p.k = m.kf;
  p.v = m.vf;
  p.k_split = m.ksf;
  p.v_split = m.vsf;
  p.pool = pool.as<uint8_t>();
  p.page_bytes = m.page_bytes;
  p.v_region_offset = size_t(m.cfg.page_tokens) * m.cfg.n_heads_kv * m.hk.record_bytes;
  p.pool_pages = m.page_bytes > 0 ? pool.size() / m.page_bytes : 0;
  p.page_tokens = m.cfg.page_tokens;
  p.n_heads_kv = m.cfg.n_heads_kv;
  p.group = n_heads_q / m.cfg.n_heads_kv;
  p.page_table = m.page_table.as<int>();
  p.max_pages_per_seq = m.cfg.max_pages_per_seq;
  p.lengths = m.lengths.as<int>();
  p.n_seqs = static_cast<int>(m.len.size());
  p.split_pages = m.cfg.split_pages;
  p.n_splits = m.n_splits;
  p.kv_one_codebook = same_codebooks(m.hk, m.hv) ? 1 : 0;
  return p;
}

// ---- bench::AppendKernels (cuda_bench.hpp) ------------------------------------
namespace bench {

struct AppendKernels::State {
  GpuKvLayer::Impl* m = nullptr;
  int n_tokens = 0, n_tiles = 0;
  DeviceBuffer buf;  // [status, pad][tiles]
};

AppendKernels::AppendKernels(GpuKvLayer& layer, int seq, int n_tokens)
    : s_(std::make_unique<State>()) {
  GpuKvLayer::Impl& m = *layer.impl_;
  m.check_seq(seq);
  TQ_REQUIRE(n_tokens >= 1 && n_tokens <= m.len[seq], "AppendKernels: ", n_tokens,
             " tokens, but sequence ", seq, " holds ", m.len[seq]);
  std::vector<AppendTile> tiles;
  m.add_tiles(seq, 0, n_tokens, 0, tiles);
  std::vector<uint8_t> h(16 + tiles.size() * sizeof(AppendTile), 0);
  std::memcpy(h.data() + 16, tiles.data(), tiles.size() * sizeof(AppendTile));
  s_->buf = DeviceBuffer(h.size());
  s_->buf.upload(h.data(), h.size());
  s_->m = &m;
  s_->n_tokens = n_tokens;
  s_->n_tiles = int(tiles.size());
}

AppendKernels::~AppendKernels() = default;

void AppendKernels::run(const void* k, const void* v, DType dtype, Stream stream) {
  TQ_REQUIRE((reinterpret_cast<uintptr_t>(k) & 15) == 0 && (reinterpret_cast<uintptr_t>(v) & 15) == 0,
             "AppendKernels::run: k and v must be 16-byte aligned");
  uint8_t* d = s_->buf.as<uint8_t>();
  s_->m->launch_kernels(k, v, dtype, reinterpret_cast<const AppendTile*>(d + 16), s_->n_tiles,
                        reinterpret_cast<int*>(d), stream);
}

int AppendKernels::n_tiles() const { return s_->n_tiles; }

}  // namespace bench

}  // namespace tq::cuda

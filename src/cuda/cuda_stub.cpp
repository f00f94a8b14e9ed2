// The GPU API in a build without CUDA: nothing is available, and anything
// that would need a device says so.
#include "cuda/kernels.hpp"
#include "cuda/mse_append.hpp"
#include "turboquant/cuda.hpp"
#include "turboquant/cuda_bench.hpp"
#include "turboquant/error.hpp"

namespace tq::cuda {
namespace {
[[noreturn]] void no_cuda() { TQ_THROW("turboquant was built without CUDA (TQ_CUDA=OFF or no nvcc)"); }
}  // namespace

bool cuda_available() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { no_cuda(); }

DeviceBuffer::DeviceBuffer(size_t) { no_cuda(); }
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer::DeviceBuffer(DeviceBuffer&&) noexcept {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&&) noexcept { return *this; }
void DeviceBuffer::upload(const void*, size_t) { no_cuda(); }
void DeviceBuffer::download(void*, size_t) const { no_cuda(); }

const char* to_string(DType t) {
  return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : "bf16";
}
size_t dtype_bytes(DType t) { return t == DType::f32 ? 4 : 2; }

struct GpuKvLayer::Impl {};
GpuKvLayer::GpuKvLayer(const Quantizer&, const Quantizer&, const GpuKvLayerConfig&) { no_cuda(); }
GpuKvLayer::~GpuKvLayer() = default;
const GpuKvLayerConfig& GpuKvLayer::config() const { no_cuda(); }
int GpuKvLayer::head_dim() const { no_cuda(); }
size_t GpuKvLayer::k_record_bytes() const { no_cuda(); }
size_t GpuKvLayer::v_record_bytes() const { no_cuda(); }
size_t GpuKvLayer::page_bytes() const { no_cuda(); }
int GpuKvLayer::add_sequence() { no_cuda(); }
int GpuKvLayer::n_seqs() const { no_cuda(); }
int GpuKvLayer::n_tokens(int) const { no_cuda(); }
int GpuKvLayer::n_pages(int) const { no_cuda(); }
int GpuKvLayer::first_record(int) const { no_cuda(); }
std::string GpuKvLayer::step_kernel() const { no_cuda(); }
void GpuKvLayer::append(int, const float*, const float*, int) { no_cuda(); }
void GpuKvLayer::append(int, const void*, const void*, int, DType) { no_cuda(); }
void GpuKvLayer::append_device(int, const float*, const float*, int, Stream) { no_cuda(); }
void GpuKvLayer::append_device(int, const void*, const void*, int, DType, Stream) { no_cuda(); }
void GpuKvLayer::append_batch_device(const int*, int, const float*, const float*, Stream) { no_cuda(); }
void GpuKvLayer::append_batch_device_async(const int*, int, const float*, const float*, Stream) { no_cuda(); }
void GpuKvLayer::append_batch_device_async(const int*, int, const void*, const void*, DType, Stream) {
  no_cuda();
}
void GpuKvLayer::check_appends() { no_cuda(); }
void GpuKvLayer::reserve_steps(const int*, int, int) { no_cuda(); }
void GpuKvLayer::append_step_device(const void*, const void*, DType, Stream) { no_cuda(); }
std::vector<int> GpuKvLayer::hi_channels(int, bool) const { no_cuda(); }
void GpuKvLayer::append_batch_device(const int*, int, const void*, const void*, DType, Stream) {
  no_cuda();
}
void GpuKvLayer::download_page(int, int, uint8_t*) const { no_cuda(); }
void GpuKvLayer::append_records(int, const uint8_t*, const uint8_t*, int) { no_cuda(); }
void GpuKvLayer::read_records(int, int, int, uint8_t*, uint8_t*) const { no_cuda(); }
size_t GpuKvLayer::workspace_bytes(int) const { no_cuda(); }
std::string GpuKvLayer::attend_kernel(int) const { no_cuda(); }
void GpuKvLayer::attend(const float*, int, const AttentionParams&, float*, float*, void*, size_t,
                        Stream) const { no_cuda(); }
void GpuKvLayer::attend(const void*, DType, int, const AttentionParams&, void*, DType, float*, void*, size_t,
                        Stream) const { no_cuda(); }

AppendFormat append_format(const MseDeviceFormat&, const std::vector<float>&, const std::vector<float>&) {
  no_cuda();
}

// Decode-kernel selection (src/cuda/kernels.hpp): nothing runs without CUDA.
const char* to_string(DecodeKernel k) {
  return k == DecodeKernel::reference ? "reference"
         : k == DecodeKernel::tensor_core ? "tensor_core" : "automatic";
}
void set_decode_kernel_override(DecodeKernel) {}
DecodeKernel decode_kernel_override() { return DecodeKernel::automatic; }
void set_decode_tc_split_override(int) {}
void set_decode_tc_tensor_copies(bool) {}
void set_decode_tc_direct_output(bool) {}
long decode_tc_direct_launches() { return 0; }
void set_decode_split_planning(SplitPlanning) {}
SplitPlanning decode_split_planning() { return SplitPlanning::automatic; }
int decode_tc_device_plan_min_split(const DecodeAttentionParams&) { no_cuda(); }
int decode_tc_tile_tokens(int) { no_cuda(); }
const char* decode_tc_unsupported(const DecodeShape&) { return "turboquant was built without CUDA"; }
DecodeKernel decode_kernel_for(const DecodeShape&) { return DecodeKernel::reference; }

DenseDecodePlan dense_decode_plan(const DenseDecodeArgs&, int) { no_cuda(); }
void dense_decode_bf16(const DenseDecodeArgs&, const DenseDecodePlan&, void*, size_t, Stream) { no_cuda(); }

namespace bench {
bool built_with_cuda() { return false; }
DeviceInfo device_info() { no_cuda(); }
EventTimer::EventTimer(int) { no_cuda(); }
EventTimer::~EventTimer() = default;
void EventTimer::start(int, Stream) { no_cuda(); }
void EventTimer::stop(int, Stream) { no_cuda(); }
float EventTimer::ms(int) const { no_cuda(); }
double EventTimer::median_ms() const { no_cuda(); }
std::vector<float> EventTimer::all_ms() const { no_cuda(); }
L2Flusher::L2Flusher(size_t) { no_cuda(); }
void L2Flusher::flush(Stream) { no_cuda(); }
void fill_normal_f32(float*, size_t, uint64_t, float, float, Stream) { no_cuda(); }
void fill_normal_bf16(uint16_t*, size_t, uint64_t, float, float, Stream) { no_cuda(); }
void read_sum_bf16(const void*, size_t, float*, Stream) { no_cuda(); }
const char* read_floor_name(int) { no_cuda(); }
bool read_floor_supported(int) { no_cuda(); }
void read_floor(const void*, size_t, unsigned*, int, Stream) { no_cuda(); }
CapturedGraph::CapturedGraph() { no_cuda(); }
CapturedGraph::~CapturedGraph() = default;
Stream CapturedGraph::stream() const { no_cuda(); }
void CapturedGraph::begin_capture() { no_cuda(); }
void CapturedGraph::end_capture() { no_cuda(); }
void CapturedGraph::replay() { no_cuda(); }
void CapturedGraph::launch() { no_cuda(); }
void copy_d2d(void*, const void*, size_t, Stream) { no_cuda(); }
void synchronize(Stream) { no_cuda(); }
struct AppendKernels::State {};
AppendKernels::AppendKernels(GpuKvLayer&, int, int) { no_cuda(); }
AppendKernels::~AppendKernels() = default;
void AppendKernels::run(const void*, const void*, DType, Stream) { no_cuda(); }
int AppendKernels::n_tiles() const { no_cuda(); }
}  // namespace bench

}  // namespace tq::cuda

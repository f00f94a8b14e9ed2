// The GPU API in a build without CUDA: nothing is available, and anything
// that would need a device says so.
#include "turboquant/cuda.hpp"
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
void GpuKvLayer::append(int, const float*, const float*, int) { no_cuda(); }
void GpuKvLayer::append_device(int, const float*, const float*, int, Stream) { no_cuda(); }
void GpuKvLayer::append_batch_device(const int*, int, const float*, const float*, Stream) { no_cuda(); }
void GpuKvLayer::download_page(int, int, uint8_t*) const { no_cuda(); }
size_t GpuKvLayer::workspace_bytes(int) const { no_cuda(); }
void GpuKvLayer::attend(const float*, int, const AttentionParams&, float*, float*, void*, size_t,
                        Stream) const { no_cuda(); }

}  // namespace tq::cuda

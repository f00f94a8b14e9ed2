// Lab probe (not built by CMake): what a captured decode step's launch
// structure costs by itself. Graphs of near-empty kernels, replayed back to
// back between two events (as `tq gpu-bench` times graph_ms): one kernel;
// two in parallel (fork / join by events, as append_step_device runs K and
// V); two in a row; the dense path's plan -> (K || V) -> copies; and one
// kernel with a 4 KB parameter block (two append formats in one launch).
//   nvcc -O3 -arch=sm_90 -o graph_floor lab/cuda/graph_floor.cu && ./graph_floor
#include <cstdio>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("%s: %s\n", #x, cudaGetErrorString(e_)); return 1; } } while (0)

__global__ void tiny(int* p) {
  if (threadIdx.x == 0) atomicAdd(p + blockIdx.x % 4, 1);
}
struct Big {
  unsigned w[1024];  // 4 KB
};
__global__ void tiny_big(const __grid_constant__ Big b, int* p) {
  if (threadIdx.x == 0) atomicAdd(p + blockIdx.x % 4, int(b.w[blockIdx.x % 1024]));
}

int main() {
  int* d;
  CK(cudaMalloc(&d, 64));
  cudaStream_t s, s2;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  cudaEvent_t fork, join, e0, e1;
  CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  Big big{};
  auto par = [&](int blocks) {
    cudaEventRecord(fork, s);
    cudaStreamWaitEvent(s2, fork, 0);
    tiny<<<blocks, 256, 0, s>>>(d);
    tiny<<<blocks, 256, 0, s2>>>(d);
    cudaEventRecord(join, s2);
    cudaStreamWaitEvent(s, join, 0);
  };
  struct V {
    const char* name;
    int variant;
  };
  const V vs[] = {{"one kernel, 1 block", 0},   {"one kernel, 16 blocks", 1}, {"two in parallel (fork/join)", 2},
                  {"two in a row", 3},          {"plan, K || V, copies", 4},  {"one kernel, 4 KB params", 5},
                  {"three in a row", 6}};
  for (const V& v : vs) {
    auto body = [&] {
      switch (v.variant) {
        case 0: tiny<<<1, 256, 0, s>>>(d); break;
        case 1: tiny<<<16, 256, 0, s>>>(d); break;
        case 2: par(8); break;
        case 3: tiny<<<8, 256, 0, s>>>(d); tiny<<<8, 256, 0, s>>>(d); break;
        case 4: tiny<<<8, 256, 0, s>>>(d); par(8); tiny<<<8, 128, 0, s>>>(d); break;
        case 5: tiny_big<<<16, 256, 0, s>>>(big, d); break;
        case 6: for (int i = 0; i < 3; ++i) tiny<<<8, 256, 0, s>>>(d); break;
      }
    };
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    body();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int rep = 0; rep < 3; ++rep) {
      const int R = 200;
      CK(cudaGraphLaunch(ge, s));
      CK(cudaStreamSynchronize(s));
      cudaEventRecord(e0, s);
      for (int i = 0; i < R; ++i) cudaGraphLaunch(ge, s);
      cudaEventRecord(e1, s);
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      // The same work launched on the stream directly, for comparison.
      cudaEventRecord(e0, s);
      for (int i = 0; i < R; ++i) body();
      cudaEventRecord(e1, s);
      CK(cudaEventSynchronize(e1));
      float ms2 = 0;
      cudaEventElapsedTime(&ms2, e0, e1);
      std::printf("%-30s graph %6.2f us/replay   stream %6.2f us/iteration\n", v.name, 1000 * ms / R, 1000 * ms2 / R);
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  }
  return 0;
}

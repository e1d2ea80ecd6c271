#include <string>

#include "apps/commands.hpp"

#ifdef REFIT_WITH_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace refit::apps {

std::string build_info() {
  std::string s = std::string("refit ") + REFIT_VERSION + " (libtorch " + REFIT_TORCH_VERSION + ")";
#ifdef REFIT_WITH_CUDA
  int runtime = 0, nccl = 0, devices = 0;
  cudaRuntimeGetVersion(&runtime);
  ncclGetVersion(&nccl);
  s += "\nCUDA runtime " + std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10) +
       ", NCCL " + std::to_string(nccl / 10000) + "." + std::to_string(nccl % 10000 / 100) + "." + std::to_string(nccl % 100);
  if (cudaError_t err = cudaGetDeviceCount(&devices); err != cudaSuccess)
    s += "\nno usable GPU: " + std::string(cudaGetErrorString(err));
  else
    s += "\nGPUs: " + std::to_string(devices);
#else
  s += "\nbuilt without CUDA";
#endif
  return s;
}

}  // namespace refit::apps

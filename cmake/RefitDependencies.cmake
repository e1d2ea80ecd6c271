# Third-party dependencies of refit, as imported targets:
#   CAF::core CAF::io CAF::openssl   Debian's libcaf-dev 0.17 (no CMake config of its own; it pulls libcaf-openssl0.17)
#   refit::torch              libtorch from the PyPI torch wheel (CUDA libraries when the wheel has them)
#   refit::cuda               CUDA runtime + NCCL, when the toolkit is found (REFIT_WITH_CUDA)
#   spdlog::spdlog nlohmann_json::nlohmann_json Boost::headers (Beast, Asio) Threads::Threads OpenSSL::Crypto CLI11::CLI11
#   Boost::unit_test_framework PkgConfig::PCRE2 ICU::uc msgpackc-cxx

find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(Python3 REQUIRED COMPONENTS Interpreter)

find_package(spdlog 1.10 REQUIRED)
find_package(nlohmann_json 3.11 REQUIRED)
find_package(OpenSSL 3 REQUIRED)
find_package(Boost 1.74 REQUIRED COMPONENTS unit_test_framework)
find_package(Threads REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)   # PkgConfig::PCRE2 (tokenizer pre-split rules)
find_package(ICU REQUIRED COMPONENTS uc)                      # ICU::uc (NFC normalisation)
find_package(msgpack 4 REQUIRED CONFIG)                       # msgpackc-cxx (Debian's libmsgpack-cxx-dev): rollout replies
find_package(CLI11 QUIET CONFIG)
if(NOT TARGET CLI11::CLI11)
  find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  set_target_properties(CLI11::CLI11 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CLI11_INCLUDE_DIR}")
endif()

# --- CAF 0.17: Debian ships headers and libraries only.
find_package(CAF 0.17 QUIET CONFIG COMPONENTS core io openssl)
if(NOT CAF_FOUND)
  find_path(CAF_INCLUDE_DIR caf/all.hpp REQUIRED)
  find_library(CAF_CORE_LIBRARY NAMES caf_core REQUIRED)
  find_library(CAF_IO_LIBRARY NAMES caf_io REQUIRED)
  find_library(CAF_OPENSSL_LIBRARY NAMES caf_openssl REQUIRED)   # the actor port's mutual TLS
  add_library(CAF::core SHARED IMPORTED)
  set_target_properties(CAF::core PROPERTIES
    IMPORTED_LOCATION "${CAF_CORE_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${CAF_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES Threads::Threads)
  add_library(CAF::io SHARED IMPORTED)
  set_target_properties(CAF::io PROPERTIES
    IMPORTED_LOCATION "${CAF_IO_LIBRARY}"
    INTERFACE_LINK_LIBRARIES CAF::core)
  add_library(CAF::openssl SHARED IMPORTED)
  set_target_properties(CAF::openssl PROPERTIES
    IMPORTED_LOCATION "${CAF_OPENSSL_LIBRARY}"
    INTERFACE_LINK_LIBRARIES "CAF::io;OpenSSL::SSL")
endif()

# --- The torch wheel (its libraries are imported below).
execute_process(
  COMMAND ${Python3_EXECUTABLE} -c "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_out RESULT_VARIABLE _torch_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "refit: python3 cannot import torch; run scripts/setup")
endif()
string(REPLACE "\n" ";" _torch_out "${_torch_out}")
list(GET _torch_out 0 REFIT_TORCH_DIR)
list(GET _torch_out 1 REFIT_TORCH_VERSION)
list(LENGTH _torch_out _n)
set(REFIT_TORCH_CUDA "")
if(_n GREATER 2)
  list(GET _torch_out 2 REFIT_TORCH_CUDA)
endif()
message(STATUS "refit: torch ${REFIT_TORCH_VERSION} at ${REFIT_TORCH_DIR} (CUDA '${REFIT_TORCH_CUDA}')")

# --- CUDA toolkit and NCCL (compile and link even where no GPU is present).
option(REFIT_WITH_CUDA "Build the CUDA/NCCL paths when the toolkit is found" ON)
set(REFIT_CUDA_FOUND OFF)
if(REFIT_WITH_CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    # NCCL: the one torch was built with (the wheel's nvidia-nccl package) before the toolkit's. torch's
    # ProcessGroupNCCL runs in this process, and NCCL refuses peers of another version ("Mismatched NCCL
    # version detected"), so a trainer with the same torch must meet the same NCCL here.
    get_filename_component(_wheel_nccl "${REFIT_TORCH_DIR}/../nvidia/nccl" ABSOLUTE)
    find_path(REFIT_NCCL_INCLUDE_DIR nccl.h HINTS ${_wheel_nccl}/include ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
    find_library(REFIT_NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR
                 HINTS ${_wheel_nccl}/lib ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64 /usr/local/cuda/lib)
    set(NCCL_INCLUDE_DIR ${REFIT_NCCL_INCLUDE_DIR})
    set(NCCL_LIBRARY ${REFIT_NCCL_LIBRARY})
    if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
      set(REFIT_CUDA_FOUND ON)
      if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
        set(CMAKE_CUDA_ARCHITECTURES 90)   # H100/H200
      endif()
      enable_language(CUDA)
      add_library(refit_cuda_deps INTERFACE)
      target_include_directories(refit_cuda_deps SYSTEM INTERFACE ${NCCL_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
      target_link_libraries(refit_cuda_deps INTERFACE CUDA::cudart ${NCCL_LIBRARY})
      target_compile_definitions(refit_cuda_deps INTERFACE REFIT_WITH_CUDA=1)
      add_library(refit::cuda ALIAS refit_cuda_deps)
      message(STATUS "refit: CUDA ${CUDAToolkit_VERSION}, NCCL ${NCCL_LIBRARY}")
    else()
      message(STATUS "refit: CUDA toolkit found but NCCL missing: CPU-only build")
    endif()
  else()
    message(STATUS "refit: no CUDA toolkit: CPU-only build")
  endif()
endif()

# --- libtorch from the torch wheel. Its include dir also carries fmt 12, which must not shadow
# Debian's fmt 9 that spdlog was built with, so only torch's own header trees are exposed (via a
# directory of symlinks), and the libraries are imported by hand rather than with TorchConfig.

set(_shim "${CMAKE_BINARY_DIR}/torch_include")
file(MAKE_DIRECTORY "${_shim}")
foreach(_d ATen c10 caffe2 torch)
  if(NOT EXISTS "${_shim}/${_d}")
    file(CREATE_LINK "${REFIT_TORCH_DIR}/include/${_d}" "${_shim}/${_d}" SYMBOLIC)
  endif()
endforeach()

set(_tl "${REFIT_TORCH_DIR}/lib")
add_library(refit_torch INTERFACE)
target_include_directories(refit_torch SYSTEM INTERFACE "${_shim}" "${REFIT_TORCH_DIR}/include/torch/csrc/api/include")
# libtorch.so exports copies of some libstdc++ functions (std::filesystem, <chrono> time zones) from
# its own toolchain, and one of them (filesystem::remove_all) crashes when called from our code.
# Listing libstdc++ ahead of libtorch makes the loader bind those names to the system library.
target_link_libraries(refit_torch INTERFACE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state")
target_link_libraries(refit_torch INTERFACE "${_tl}/libtorch.so" "${_tl}/libtorch_cpu.so" "${_tl}/libc10.so" Threads::Threads)
if(REFIT_CUDA_FOUND AND REFIT_TORCH_CUDA AND EXISTS "${_tl}/libtorch_cuda.so")
  # libtorch_cuda registers the CUDA backend from static initialisers: keep it even though no symbol is used.
  target_link_libraries(refit_torch INTERFACE "-Wl,--no-as-needed,${_tl}/libtorch_cuda.so,--as-needed" "${_tl}/libc10_cuda.so" refit::cuda)
  target_compile_definitions(refit_torch INTERFACE REFIT_TORCH_CUDA=1)
  set(REFIT_TORCH_WITH_CUDA ON)
  set(REFIT_TORCH_NCCL_INCLUDE ${NCCL_INCLUDE_DIR})  # torch's c10d headers see the same nccl.h
else()
  set(REFIT_TORCH_WITH_CUDA OFF)
endif()
set_property(TARGET refit_torch PROPERTY INTERFACE_LINK_OPTIONS "-Wl,-rpath,${_tl}")
add_library(refit::torch ALIAS refit_torch)

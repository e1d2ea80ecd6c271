# Qwen3ForCausalLM text encoder (FLUX.2-klein prompt embeddings) against transformers.
add_executable(probe_qwen3 ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_qwen3.cpp)
target_link_libraries(probe_qwen3 PRIVATE refit_models refit_test_tensor_io)
target_precompile_headers(probe_qwen3 REUSE_FROM refit_test_tensor_io)
add_test(NAME oracle.qwen3
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_qwen3_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.qwen3 PROPERTIES ENVIRONMENT "REFIT_PROBE_QWEN3=$<TARGET_FILE:probe_qwen3>")

# The whole FLUX.2-klein pipeline (and `refit make-model` / `refit generate`) against diffusers.
add_executable(probe_pipeline ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_pipeline.cpp)
target_link_libraries(probe_pipeline PRIVATE refit_pipeline refit_test_tensor_io)
target_precompile_headers(probe_pipeline REUSE_FROM refit_test_tensor_io)
add_test(NAME oracle.pipeline
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_pipeline_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.pipeline PROPERTIES
  ENVIRONMENT "REFIT_PROBE_PIPELINE=$<TARGET_FILE:probe_pipeline>;REFIT_BIN=$<TARGET_FILE:refit>")

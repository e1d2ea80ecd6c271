# Flux2Transformer2DModel against diffusers.
add_executable(probe_flux2 ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_flux2.cpp)
target_link_libraries(probe_flux2 PRIVATE refit_models refit_test_tensor_io)
target_precompile_headers(probe_flux2 REUSE_FROM refit_test_tensor_io)
add_test(NAME oracle.flux2_transformer
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_flux2_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.flux2_transformer PROPERTIES ENVIRONMENT "REFIT_PROBE_FLUX2=$<TARGET_FILE:probe_flux2>")

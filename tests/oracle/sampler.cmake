# The flow-match schedule against diffusers' FlowMatchEulerDiscreteScheduler and compute_empirical_mu.
add_executable(probe_sampler ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_sampler.cpp)
target_link_libraries(probe_sampler PRIVATE refit_models nlohmann_json::nlohmann_json)
add_test(NAME oracle.sampler
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_sampler_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.sampler PROPERTIES ENVIRONMENT "REFIT_PROBE_SAMPLER=$<TARGET_FILE:probe_sampler>")

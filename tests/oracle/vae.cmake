# AutoencoderKLFlux2 (and the Klein pipeline's latent packing and BatchNorm statistics) against diffusers.
add_executable(probe_vae ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_vae.cpp)
target_link_libraries(probe_vae PRIVATE refit_models refit_test_tensor_io)
target_precompile_headers(probe_vae REUSE_FROM refit_test_tensor_io)
add_test(NAME oracle.vae
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_vae_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.vae PROPERTIES ENVIRONMENT "REFIT_PROBE_VAE=$<TARGET_FILE:probe_vae>")

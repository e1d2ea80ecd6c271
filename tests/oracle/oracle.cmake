# Oracle tests: each builds a probe that exposes one refit component to a pytest file, which compares
# it with the Python reference libraries (diffusers, transformers, tokenizers) on the same inputs.
#   refit_oracle_test(NAME PROBE SOURCE PYTEST ENV LIBS... [EXTRA_ENV ...])
function(refit_oracle_test name probe pytest env_var)
  cmake_parse_arguments(ARG "" "" "LIBS;EXTRA_ENV" ${ARGN})
  add_executable(${probe} ${CMAKE_CURRENT_SOURCE_DIR}/tools/${probe}.cpp)
  target_link_libraries(${probe} PRIVATE ${ARG_LIBS})
  if(refit_test_tensor_io IN_LIST ARG_LIBS)
    target_precompile_headers(${probe} REUSE_FROM refit_test_tensor_io)
  endif()
  add_test(NAME oracle.${name}
    COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/${pytest}
    WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
  set_tests_properties(oracle.${name} PROPERTIES ENVIRONMENT "${env_var}=$<TARGET_FILE:${probe}>;${ARG_EXTRA_ENV}")
endfunction()

refit_oracle_test(flux2_transformer probe_flux2 test_flux2_oracle.py REFIT_PROBE_FLUX2 LIBS refit_models refit_test_tensor_io)
refit_oracle_test(sampler probe_sampler test_sampler_oracle.py REFIT_PROBE_SAMPLER LIBS refit_models nlohmann_json::nlohmann_json)
refit_oracle_test(qwen3 probe_qwen3 test_qwen3_oracle.py REFIT_PROBE_QWEN3 LIBS refit_models refit_test_tensor_io)
refit_oracle_test(vae probe_vae test_vae_oracle.py REFIT_PROBE_VAE LIBS refit_models refit_test_tensor_io)
refit_oracle_test(tokenizer probe_tokenizer test_tokenizer_oracle.py REFIT_PROBE_TOKENIZER LIBS refit_models nlohmann_json::nlohmann_json)
refit_oracle_test(pipeline probe_pipeline test_pipeline_oracle.py REFIT_PROBE_PIPELINE LIBS refit_pipeline refit_test_tensor_io
  EXTRA_ENV "REFIT_BIN=$<TARGET_FILE:refit>")

# /rollout/generate against SGLang's own FlowRolloutController (from its wheel, installed by scripts/setup) and
# Diffusers' transformer, through the real server.
add_test(NAME oracle.rollout
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_rollout_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.rollout PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;SGLANG_SITE=${PROJECT_SOURCE_DIR}/.deps-py/sglang" TIMEOUT 900)

# LoRA (/v1/set_lora, merge/unmerge, list_loras, update_weights_from_disk "lora_merge") against Diffusers' load_lora_weights +
# fuse_lora and PEFT's merge, through the real server.
add_test(NAME oracle.lora
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_lora_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.lora PROPERTIES ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>" TIMEOUT 900)

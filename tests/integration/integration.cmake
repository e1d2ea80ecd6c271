# HTTP integration suite (issue 5): pytest starts the real `refit serve` on free loopback ports with tiny checkpoints
# from `refit make-model`. Python packages: requests, openai, safetensors, torch; Debian package: prometheus (promtool).
add_test(NAME integration.http
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration
          --ignore=${CMAKE_CURRENT_SOURCE_DIR}/integration/test_distributed.py
          --ignore=${CMAKE_CURRENT_SOURCE_DIR}/integration/test_tensor_update.py
          --ignore=${CMAKE_CURRENT_SOURCE_DIR}/integration/test_flow_grpo.py
          --ignore=${CMAKE_CURRENT_SOURCE_DIR}/integration/test_remote_workers.py)
set_tests_properties(integration.http PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;REFIT_REMOTE_CLIENT=$<TARGET_FILE:refit_remote_client>;REFIT_ACTOR_PROBE=$<TARGET_FILE:actor_port_probe>"
  TIMEOUT 600)

# Weights from a trainer (issue 14): real PyTorch trainer processes (trainer.py, with SGLang's own
# init_custom_process_group from the wheel scripts/setup installs) broadcast over Gloo on loopback to the real server.
add_test(NAME integration.distributed
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration/test_distributed.py)
set_tests_properties(integration.distributed PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;SGLANG_SITE=${PROJECT_SOURCE_DIR}/.deps-py/sglang;GLOO_SOCKET_IFNAME=lo"
  TIMEOUT 600)

# Weights from a colocated trainer (SGLang's update_weights_from_tensor and its checker): a real PyTorch trainer
# process (tensor_trainer.py, with SGLang's own MultiprocessingSerializer and FlattenedTensorBucket from the wheel
# scripts/setup installs) shares its tensors through torch's "file_system" strategy (/dev/shm) with the real server.
add_test(NAME integration.tensor
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration/test_tensor_update.py)
set_tests_properties(integration.tensor PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;SGLANG_SITE=${PROJECT_SOURCE_DIR}/.deps-py/sglang"
  TIMEOUT 600)

# The whole RL loop (issue 20): examples/flow_grpo's Flow-GRPO trainer (Diffusers + PEFT) drives the real server for
# 3 iterations through each transport that runs on a CPU (disk, set_lora, Gloo, shared tensors), asserting the
# policy ratio is 1, the rollouts' weight_version and the served checksum every iteration.
add_test(NAME integration.flow_grpo
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration/test_flow_grpo.py)
set_tests_properties(integration.flow_grpo PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;GLOO_SOCKET_IFNAME=lo"
  TIMEOUT 600)

# Workers on other hosts (issue 18): real `refit serve` and `refit worker --join` processes on loopback, joined through a
# TCP relay the test cuts for a network partition; workers killed and cut off mid-update, rejoining, wrong secrets.
add_test(NAME integration.remote_workers
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration/test_remote_workers.py)
set_tests_properties(integration.remote_workers PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>"
  TIMEOUT 600)

# HTTP integration suite (issue 5): pytest starts the real `refit serve` on free loopback ports with tiny checkpoints
# from `refit make-model`. Python packages: requests, openai, safetensors, torch; Debian package: prometheus (promtool).
add_test(NAME integration.http
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/integration)
set_tests_properties(integration.http PROPERTIES
  ENVIRONMENT "REFIT_BIN=$<TARGET_FILE:refit>;REFIT_REMOTE_CLIENT=$<TARGET_FILE:refit_remote_client>"
  TIMEOUT 600)

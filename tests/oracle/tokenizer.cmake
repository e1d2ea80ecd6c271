# The Qwen2 byte-level BPE tokenizer and the Klein prompt batch against `tokenizers` and `transformers`.
add_executable(probe_tokenizer ${CMAKE_CURRENT_SOURCE_DIR}/tools/probe_tokenizer.cpp)
target_link_libraries(probe_tokenizer PRIVATE refit_models nlohmann_json::nlohmann_json)
add_test(NAME oracle.tokenizer
  COMMAND ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/oracle/test_tokenizer_oracle.py
  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
set_tests_properties(oracle.tokenizer PROPERTIES ENVIRONMENT "REFIT_PROBE_TOKENIZER=$<TARGET_FILE:probe_tokenizer>")

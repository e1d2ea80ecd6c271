// Hugging Face repo ids as model paths, resolved offline through the local hub cache (what SGLang's
// maybe_download_model finds first): refit never downloads.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace refit::weights {

// The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
std::filesystem::path hf_hub_cache();

// Whether `text` is spelled like a repo id ("org/name" or "name": letters, digits, '.', '_', '-').
bool looks_like_repo_id(std::string_view text);

// The snapshot folder of the cached repo's `main` revision (hub/models--org--name/snapshots/<refs/main>),
// or nullopt when it is not cached.
std::optional<std::filesystem::path> find_cached_repo(std::string_view repo_id);

// A model path as users give it: an existing path stays as it is; a repo id that is not a path resolves
// to its cached snapshot. Throws std::runtime_error "Failed to download model: ..." (SGLang's words) for
// an uncached repo id; anything else is returned unchanged for the caller to report.
std::string resolve_model_path(const std::string& path_or_repo_id);

}  // namespace refit::weights

// The atoms that name refit's messages (at most 10 characters each). Which actor accepts which is in
// client_api.hpp (what clients may send) and control.hpp (what refit's own actors send each other).
#pragma once

#include <caf/atom.hpp>

namespace refit::msg {

// Client API
using generate_atom = caf::atom_constant<caf::atom("generate")>;
using update_atom = caf::atom_constant<caf::atom("update")>;
using checksum_atom = caf::atom_constant<caf::atom("checksum")>;
using info_atom = caf::atom_constant<caf::atom("info")>;
using stats_atom = caf::atom_constant<caf::atom("stats")>;
using rollout_atom = caf::atom_constant<caf::atom("rollout")>;
using join_group_atom = caf::atom_constant<caf::atom("joingroup")>;
using leave_group_atom = caf::atom_constant<caf::atom("leavegroup")>;

// Internal control: update phases, generation gating, supervision, fault injection
using validate_atom = caf::atom_constant<caf::atom("validate")>;
using stage_atom = caf::atom_constant<caf::atom("stage")>;
using commit_atom = caf::atom_constant<caf::atom("commit")>;
using rollback_atom = caf::atom_constant<caf::atom("rollback")>;
using finalize_atom = caf::atom_constant<caf::atom("finalize")>;
using discard_atom = caf::atom_constant<caf::atom("discard")>;
using pause_atom = caf::atom_constant<caf::atom("pause")>;
using resume_atom = caf::atom_constant<caf::atom("resume")>;
using reset_atom = caf::atom_constant<caf::atom("reset")>;
using fault_atom = caf::atom_constant<caf::atom("fault")>;
using done_atom = caf::atom_constant<caf::atom("done")>;
using modules_atom = caf::atom_constant<caf::atom("modules")>;
using recover_atom = caf::atom_constant<caf::atom("recover")>;
using decide_atom = caf::atom_constant<caf::atom("decide")>;
using teacache_atom = caf::atom_constant<caf::atom("teacache")>;
using receive_atom = caf::atom_constant<caf::atom("receive")>;
using release_atom = caf::atom_constant<caf::atom("release")>;
using lora_atom = caf::atom_constant<caf::atom("lora")>;
using list_loras_atom = caf::atom_constant<caf::atom("listloras")>;
using tensor_hashes_atom = caf::atom_constant<caf::atom("tenshashes")>;
using release_memory_atom = caf::atom_constant<caf::atom("relmemory")>;
using resume_memory_atom = caf::atom_constant<caf::atom("resmemory")>;
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;

// Workers on other hosts (cluster.hpp)
using join_worker_atom = caf::atom_constant<caf::atom("joinworker")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using abandon_atom = caf::atom_constant<caf::atom("abandon")>;

}  // namespace refit::msg

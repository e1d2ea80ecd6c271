// How large the device loader's pinned staging ring is, from the machine's last-level cache (issue 19).
// Every byte of a warm disk refit crosses memory: the page cache is read, a ring slot written, the slot read
// by the copy engine. A ring larger than the last-level cache sends all three through DRAM; a ring that stays
// in the cache lets the DMA read what a reader thread has just written from the cache, and the refit runs
// at the PCIe link's rate instead of DRAM's. The ring is therefore about half the LLC, split into one slot
// per reader thread and one more for each to fill while the other is copied.
#pragma once

#include <cstdint>
#include <string>

namespace refit::weights {

struct staging_geometry {
  uint64_t slot_bytes = 0;
  unsigned slots = 0;
  unsigned threads = 0;
  unsigned copy_streams = 1;  // host-to-device streams the slots' copies alternate over
  uint64_t llc_bytes = 0;  // 0: unknown
  std::string source;      // how it was chosen, for the log
};

// The largest cache of cpu0 per sysfs (/sys/devices/system/cpu/cpu0/cache/index*/size); 0 when unknown.
uint64_t last_level_cache_bytes();

// From the LLC and the core count: 2 x threads slots whose total is about half the LLC, each a power of two
// between 2 MiB and 32 MiB (the O_DIRECT alignment is far below), copied on one stream. REFIT_STAGING_SLOT_MB,
// REFIT_STAGING_SLOTS and REFIT_STAGING_STREAMS override it (for benchmarks); an override that is not a positive
// number is an error.
staging_geometry choose_staging_geometry();

// The rule alone, for tests: `llc_bytes` 0 means unknown.
staging_geometry staging_geometry_for(uint64_t llc_bytes, unsigned hardware_threads);

}  // namespace refit::weights

// The device loader's staging ring follows the last-level cache (pipeline/weights/staging_geometry.hpp).
#define BOOST_TEST_MODULE staging_geometry
#include <boost/test/unit_test.hpp>

#include <cstdlib>

#include "pipeline/weights/staging_geometry.hpp"

using namespace refit::weights;
constexpr uint64_t MiB = 1ull << 20;

BOOST_AUTO_TEST_CASE(a_300_mib_llc_gives_a_128_mib_ring_of_32_slots) {
  const auto g = staging_geometry_for(300 * MiB, 64);
  BOOST_TEST(g.threads == 16u);
  BOOST_TEST(g.slots == 32u);
  BOOST_TEST(g.slot_bytes == 4 * MiB);  // 32 x 4 MiB = 128 MiB <= 150 MiB; 8 MiB slots would be 256 MiB
  BOOST_TEST(g.source == "half the 300 MiB last-level cache");
}

BOOST_AUTO_TEST_CASE(the_slot_stays_between_2_and_32_mib) {
  BOOST_TEST(staging_geometry_for(16 * MiB, 16).slot_bytes == 2 * MiB);      // a small LLC: the floor
  BOOST_TEST(staging_geometry_for(8192 * MiB, 16).slot_bytes == 32 * MiB);   // a huge one: the old size
  BOOST_TEST(staging_geometry_for(0, 16).slot_bytes == 4 * MiB);             // unknown: a 128 MiB ring
  BOOST_TEST(staging_geometry_for(0, 16).source == "last-level cache unknown");
}

BOOST_AUTO_TEST_CASE(few_cores_mean_few_threads_and_larger_slots_in_the_same_ring) {
  const auto g = staging_geometry_for(64 * MiB, 2);
  BOOST_TEST(g.threads == 2u);
  BOOST_TEST(g.slots == 4u);
  BOOST_TEST(g.slot_bytes == 8 * MiB);  // 4 x 8 MiB = 32 MiB = half the LLC
}

BOOST_AUTO_TEST_CASE(the_environment_overrides_and_rejects_nonsense) {
  ::setenv("REFIT_STAGING_SLOT_MB", "32", 1);
  ::setenv("REFIT_STAGING_SLOTS", "8", 1);
  auto g = choose_staging_geometry();
  BOOST_TEST(g.slot_bytes == 32 * MiB);
  BOOST_TEST(g.slots == 8u);
  BOOST_TEST(g.source == "REFIT_STAGING_SLOT_MB / REFIT_STAGING_SLOTS");
  ::setenv("REFIT_STAGING_SLOT_MB", "lots", 1);
  BOOST_CHECK_EXCEPTION(choose_staging_geometry(), std::invalid_argument, [](const std::invalid_argument& e) {
    return std::string(e.what()) == "REFIT_STAGING_SLOT_MB='lots' is not a positive number (at most 4096)";
  });
  ::unsetenv("REFIT_STAGING_SLOT_MB");
  ::unsetenv("REFIT_STAGING_SLOTS");
  BOOST_TEST(choose_staging_geometry().copy_streams == 1u);
  ::setenv("REFIT_STAGING_STREAMS", "2", 1);
  BOOST_TEST(choose_staging_geometry().copy_streams == 2u);
  ::setenv("REFIT_STAGING_STREAMS", "9", 1);
  BOOST_CHECK_EXCEPTION(choose_staging_geometry(), std::invalid_argument, [](const std::invalid_argument& e) {
    return std::string(e.what()) == "REFIT_STAGING_STREAMS=9: at most 8 copy streams";
  });
  ::unsetenv("REFIT_STAGING_STREAMS");
  g = choose_staging_geometry();
  BOOST_TEST(g.slots == 2 * g.threads);
  BOOST_TEST(g.slot_bytes >= 2 * MiB);
  BOOST_TEST(g.slot_bytes <= 32 * MiB);
}

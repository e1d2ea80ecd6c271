// Workers from other processes (refit worker --join): admitting one, bringing it to the served weights
// before it gets requests (a catch-up transaction with it as the only member), and losing one (its
// relays fail what was asked of it; generations it was running go back to the queue).
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include "actors/remote_relay.hpp"
#include "actors/scheduler_state.hpp"
#include "actors/update_transaction.hpp"

namespace refit::actors::sched {

const char *to_string(worker_status s) {
  switch (s) {
    case worker_status::serving: return "serving";
    case worker_status::catching_up: return "catching_up";
    case worker_status::lost: return "lost";
  }
  return "?";
}

std::vector<size_t> serving_workers(const sched_state &st) {
  std::vector<size_t> out;
  for (size_t w = 0; w < st.slots.size(); ++w)
    if (st.slots[w].status == worker_status::serving) out.push_back(w);
  return out;
}

namespace {

std::string label(const worker_slot &s, size_t w) {
  return "worker " + std::to_string(w) + " (" + (s.host.empty() ? "local" : s.host) + ", " + s.device + ")";
}

bool same_secret(const std::string &given, const std::string &expected) {
  return given.size() == expected.size() && CRYPTO_memcmp(given.data(), expected.data(), given.size()) == 0;
}

// Why the served weights cannot be given to a joining worker (empty: they can). Only folders can be read
// again: weights a trainer broadcast or shared, or merged LoRA adapters, exist in no file the worker could read.
std::string not_repeatable(const sched_state &st) {
  for (const auto &[module, source] : st.setup.served)
    if (source.kind != msg::source_kind::checkpoint)
      return "module '" + module + "' holds weights from a " + msg::to_string(source.kind) +
             " update (weight_version " + st.weight_version +
             "), which a joining worker cannot read; update the server from disk first";
  return {};
}

}  // namespace

caf::result<msg::join_reply> join_worker(self_ptr self, msg::worker_offer &offer) {
  auto &st = self->state;
  auto refuse = [&](std::string why, bool permanent) {
    spdlog::warn("join: refused a worker from '{}' ({}): {}", offer.host, offer.device, why);
    return msg::join_reply{false, -1, std::move(why), permanent};
  };
  if (st.setup.worker_secret.empty())
    return refuse("this server takes no workers (start it with --worker-secret-file)", true);
  if (!same_secret(offer.secret, st.setup.worker_secret)) return refuse("wrong worker secret", true);
  if (st.shutting_down) return refuse("the server is shutting down", false);
  if (offer.class_name != st.setup.class_name)
    return refuse("the worker serves " + offer.class_name + ", this server " + st.setup.class_name, true);
  if (offer.modules != st.setup.modules) return refuse("the worker's pipeline has other modules than this server's", true);
  if (!offer.worker || !offer.supervisor || !offer.cache || !offer.transfer || !offer.agent)
    return refuse("the offer lacks an actor", true);
  if (auto why = not_repeatable(st); !why.empty()) return refuse(why, false);
  const size_t w = st.slots.size();
  worker_slot slot;
  slot.device = offer.device;
  slot.host = offer.host.empty() ? "remote" : offer.host;
  slot.status = worker_status::catching_up;
  slot.local_index = offer.local_index;
  slot.remote = offer.worker.address();
  auto link = std::make_shared<relay_link>(self->system(), label(slot, w));
  slot.agent = spawn_relay(link, offer.agent);
  st.setup.workers.push_back(spawn_relay(link, offer.worker));
  st.setup.supervisors.push_back(spawn_relay(link, offer.supervisor));
  st.setup.caches.push_back(spawn_relay(link, offer.cache));
  st.setup.transfers.push_back(spawn_relay(link, offer.transfer));
  st.setup.cancels.push_back(std::make_shared<std::atomic<bool>>(false));  // unused: its agent cancels
  st.in_flight.push_back(0);
  st.slots.push_back(std::move(slot));
  self->monitor(offer.worker);
  // When the scheduler stops, so do the relays (and with them this server's proxies of the joined actors).
  std::vector<caf::actor> relays{caf::actor_cast<caf::actor>(st.slots[w].agent), caf::actor_cast<caf::actor>(st.setup.workers[w]),
                                 caf::actor_cast<caf::actor>(st.setup.supervisors[w]), caf::actor_cast<caf::actor>(st.setup.caches[w]),
                                 caf::actor_cast<caf::actor>(st.setup.transfers[w])};
  self->attach_functor([link, relays](const caf::error&) {
    link->close();
    for (const auto& r : relays) caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
  });
  spdlog::info("join: {} joined; giving it the served weights (weight_version {})", label(st.slots[w], w), st.weight_version);
  pending_update job;
  job.catch_up = static_cast<int32_t>(w);
  st.updates.push_back(std::move(job));
  start_next_update(self);
  return msg::join_reply{true, static_cast<int32_t>(w), "joined as worker " + std::to_string(w), false};
}

void worker_down(self_ptr self, const caf::down_msg &dm) {
  auto &st = self->state;
  for (size_t w = 0; w < st.slots.size(); ++w) {
    auto &slot = st.slots[w];
    if (slot.remote != dm.source || slot.status == worker_status::lost) continue;
    slot.status = worker_status::lost;
    spdlog::warn("join: {} is gone ({}); it gets no requests until its process joins again", label(slot, w),
                 self->system().render(dm.reason));
  }
}

void cancel_on(self_ptr self, size_t w, bool on) {
  auto &st = self->state;
  const auto &slot = st.slots[w];
  if (slot.host.empty()) {
    st.setup.cancels[w]->store(on);
    return;
  }
  if (slot.status == worker_status::lost) return;
  self->request(slot.agent, query_timeout, msg::cancel_atom::value, slot.local_index, on)
      .then([](bool) {}, [w](caf::error &e) { spdlog::warn("worker {}: could not cancel its generation: {}", w, msg::describe(e)); });
}

// Why worker w cannot be caught up now (empty: it can).
std::string no_catch_up(const sched_state &st, size_t w) {
  if (st.slots[w].status != worker_status::catching_up) return "it was lost before its turn";
  if (st.shutting_down) return "the server is shutting down";
  if (st.sleeping) return "the server is sleeping (release_memory_occupation)";
  return not_repeatable(st);
}

void start_catch_up(self_ptr self, pending_update job) {
  auto &st = self->state;
  const auto w = static_cast<size_t>(job.catch_up);
  if (auto why = no_catch_up(st, w); !why.empty()) {
    msg::update_result none;
    none.message = why;
    return catch_up_finished(self, w, none);
  }
  transaction_context ctx{self, st.setup.supervisors, st.setup.caches, st.setup.modules, st.setup.denoiser, st.setup.transfers,
                          ++st.transactions, st.setup.allowed_roots, {w}, {}, {}};
  for (auto [module, source] : st.setup.served) {
    source.check_finite = false;  // these are the weights every other worker serves
    ctx.preplanned[module] = source;
  }
  job.req.source = msg::source_kind::checkpoint;
  job.req.flush_cache = true;
  job.req.mode = msg::update_mode::auto_select;
  job.req.weight_version = st.weight_version;
  auto txn = spawn_update_transaction(self->system(), std::move(ctx));
  self->request(txn, caf::infinite, msg::update_atom::value, job.req)
      .then([self, w](msg::update_result &r) { catch_up_finished(self, w, r); },
            [self, w](caf::error &e) {
              msg::update_result r;
              r.message = msg::describe(e);
              catch_up_finished(self, w, r);
            });
}

void record_served(sched_state &st, const msg::update_result &r) {
  // `applied` is set once an update is decided, even when a participant failed after that: those are the weights served.
  for (const auto &[module, source] : r.applied) st.setup.served[module] = source;
}

void catch_up_finished(self_ptr self, size_t w, const msg::update_result &r) {
  auto &st = self->state;
  auto &slot = st.slots[w];
  if (slot.status == worker_status::catching_up && r.success) {
    slot.status = worker_status::serving;
    spdlog::info("join: {} holds the served weights (weight_version {}) after {:.3f} s; it serves from now on", label(slot, w),
                 st.weight_version, r.timings.count("total") ? r.timings.at("total") : 0.0);
  } else if (slot.status != worker_status::lost) {
    slot.status = worker_status::lost;
    spdlog::warn("join: {} could not be given the served weights: {}; it gets no requests", label(slot, w), r.message);
    self->send(slot.agent, msg::abandon_atom::value, slot.local_index, r.message);  // its process joins again later
  }
  st.updating = false;
  dispatch(self);
  start_next_update(self);
}

}  // namespace refit::actors::sched

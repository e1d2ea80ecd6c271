// The one fan-out of refit's actors: ask each of several actors, gather every reply or error, and
// continue once all have answered. Used by the update transaction and the scheduler alike.
#pragma once

#include <caf/error.hpp>

#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace refit::actors {

// What a fan-out gathered: each key's reply, or its error (every key has exactly one of the two).
template <class Reply>
struct fan_in {
  std::map<size_t, Reply> replies;
  std::map<size_t, caf::error> errors;
  bool ok(size_t key) const { return replies.count(key) > 0; }
};

// Sends ask(key) for every key (ask issues one request and returns its pending handle, e.g.
// `self->request(...)`), then calls `done` once with what came back. With no keys, `done` runs at once.
template <class Reply, class Ask>
void fan_out(const std::vector<size_t>& keys, Ask&& ask, std::function<void(fan_in<Reply>&)> done) {
  struct gather {
    size_t pending;
    fan_in<Reply> in;
    std::function<void(fan_in<Reply>&)> done;
    void one() {
      if (--pending == 0) done(in);
    }
  };
  auto g = std::make_shared<gather>(gather{keys.size(), {}, std::move(done)});
  if (keys.empty()) return g->done(g->in);
  for (size_t key : keys)
    ask(key).then(
        [g, key](Reply& r) {
          g->in.replies.emplace(key, std::move(r));
          g->one();
        },
        [g, key](caf::error& e) {
          g->in.errors.emplace(key, std::move(e));
          g->one();
        });
}

// 0, 1, ..., n - 1: the keys of a fan-out over a whole list.
inline std::vector<size_t> indices(size_t n) {
  std::vector<size_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

}  // namespace refit::actors

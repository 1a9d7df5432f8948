// SPDX-License-Identifier: MIT
// The one exception bkn throws, and the checks that build its messages.
// Validation runs on the host before anything is written, so a thrown call changed nothing.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE

/// Thrown on the host when an argument is invalid. what() names the routine, the argument, what
/// was expected and what was given, e.g.
/// "bkn::forward: gamma: expected 64 elements (one per channel), got 63".
/// Outputs, running statistics and states are untouched when it is thrown.
class invalid_argument : public std::invalid_argument {
 public:
  invalid_argument(const char* routine, const char* argument, const std::string& problem)
      : std::invalid_argument(std::string(routine) + ": " + argument + ": " + problem),
        routine_(routine),
        argument_(argument) {}

  /// The public routine that rejected the call, e.g. "bkn::forward".
  const char* routine() const noexcept { return routine_; }
  /// The argument at fault, e.g. "gamma" or "x.strides".
  const char* argument() const noexcept { return argument_; }

 private:
  const char* routine_;
  const char* argument_;
};

/// Thrown on the host by a routine called with options.check_finite when an input holds NaN or
/// Inf: names the routine, the tensor and the first such element. Nothing has been written.
class nonfinite_input : public std::domain_error {
 public:
  nonfinite_input(const char* routine, const char* argument, index_t n, index_t c, index_t h,
                  index_t w, double value)
      : std::domain_error(std::string(routine) + ": " + argument + ": non-finite value " +
                          std::to_string(value) + " at (n, c, h, w) = (" + std::to_string(n) +
                          ", " + std::to_string(c) + ", " + std::to_string(h) + ", " +
                          std::to_string(w) + ")"),
        routine_(routine),
        argument_(argument),
        sample_(n),
        channel_(c) {}

  const char* routine() const noexcept { return routine_; }
  const char* argument() const noexcept { return argument_; }
  /// The sample and channel of the first non-finite element, in (n, c, h, w) order.
  index_t sample() const noexcept { return sample_; }
  index_t channel() const noexcept { return channel_; }

 private:
  const char* routine_;
  const char* argument_;
  index_t sample_, channel_;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws invalid_argument(routine, argument, problem...) unless `ok`.
template <class... Parts>
void require(bool ok, const char* routine, const char* argument, const Parts&... problem) {
  if (!ok) throw invalid_argument(routine, argument, concat(problem...));
}

/// Requires an optional array to be empty or to hold `expected` elements (`what` says why).
inline void check_optional(const char* routine, const char* name, index_t size, index_t expected,
                           const char* what) {
  require(size == 0 || size == expected, routine, name, "expected ", expected, " elements (",
          what, ") or none, got ", size);
}

}  // namespace detail

BKN_END_NAMESPACE

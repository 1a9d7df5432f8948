// SPDX-License-Identifier: MIT
// thrown(f): runs f and returns the bkn::invalid_argument it throws, failing the test if it
// throws nothing, so a test can then check routine(), argument() and what().
#pragma once

#include <doctest/doctest.h>

#include <bkn/error.hpp>

namespace bkn_test {

template <class F>
bkn::invalid_argument thrown(F f) {
  try {
    f();
  } catch (const bkn::invalid_argument& e) {
    return e;
  }
  FAIL("expected bkn::invalid_argument");
  return bkn::invalid_argument("", "", "");
}

}  // namespace bkn_test

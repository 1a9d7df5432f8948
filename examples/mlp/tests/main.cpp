// SPDX-License-Identifier: MIT
// The one main() of the MLP example's test executables.
// Plain doctest: every case runs; none is marked skip.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

// SPDX-License-Identifier: MIT
// The main() of the CUDA backend's test programs (the shared one of tests/doctest_main.cpp), and
// the operator new that counts the calling thread's allocations, for the test that passes
// allocate nothing. A .cpp: nvcc would compile a replacement operator new for the device too.
#include "doctest_main.cpp"

#include <cstdlib>
#include <new>

#include "support.hpp"

namespace {
thread_local long allocation_count = 0;
}  // namespace

long cuda_test::allocations() noexcept { return allocation_count; }

void* operator new(std::size_t bytes) {
  ++allocation_count;
  if (void* p = std::malloc(bytes > 0 ? bytes : 1)) return p;
  throw std::bad_alloc();
}
// GCC inlines these into std::allocator code and then sees free() meet a new-expression: the
// pairing is right (both replaced), the warning a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

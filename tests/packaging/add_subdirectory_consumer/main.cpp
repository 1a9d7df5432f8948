#include <bkn/bkn.hpp>
#include <bkn/backends/reference.hpp>

#include <cstdio>

int main() {
  std::printf("bkn %d.%d via add_subdirectory\n", BKN_VERSION_MAJOR, BKN_VERSION_MINOR);
  return 0;
}

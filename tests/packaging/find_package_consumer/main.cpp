#include <bkn/bkn.hpp>
#include <bkn/backends/reference.hpp>

#include <cstdio>

int main() {
  std::printf("bkn %d.%d via find_package\n", BKN_VERSION_MAJOR, BKN_VERSION_MINOR);
  return 0;
}

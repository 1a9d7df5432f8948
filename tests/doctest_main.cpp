// The one main() shared by every test executable.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  // ctest learns the test cases from --list-test-cases, which normally hides cases marked
  // doctest::skip(). Listing them anyway registers them with ctest; running one then prints
  // "test cases: 0 |", which SKIP_REGULAR_EXPRESSION turns into "Skipped" rather than a pass.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list-test-cases") == 0 || std::strcmp(argv[i], "-ltc") == 0) {
      context.setOption("no-skip", true);
    }
  }
  return context.run();
}

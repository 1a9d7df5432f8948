# Flags for bkn's own tests, benchmarks and examples. Always PRIVATE: nothing here reaches
# bkn::* consumers.

function(bkn_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic
                           $<$<BOOL:${BKN_WARNINGS_AS_ERRORS}>:-Werror>)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-
                           $<$<BOOL:${BKN_WARNINGS_AS_ERRORS}>:/WX>)
  endif()
endfunction()

# BKN_SANITIZE=address,undefined (or any -fsanitize= list). Recovery is off so that a
# UBSan report fails the test instead of only printing.
function(bkn_sanitizers target)
  if(NOT BKN_SANITIZE)
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "bkn: BKN_SANITIZE needs GCC or Clang")
  endif()
  set(flags -fsanitize=${BKN_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(${target} PRIVATE ${flags})
  target_link_options(${target} PRIVATE ${flags})
endfunction()

# ctest smoke test of bkn_estimation: `--quick` must exit 0, print the table header and write
# its files. No numbers are asserted. Usage:
#   cmake -DEXE=<path of bkn_estimation> -DOUT=<output folder> -P smoke_test.cmake
foreach(var EXE OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "smoke_test.cmake: pass -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${OUT}")
execute_process(COMMAND "${EXE}" --quick --out "${OUT}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "bkn_estimation --quick exited with ${rc}")
endif()
string(FIND "${out}" "| method | m | var rel. MSE (L2-4) | mean error (L2-4) | skip fired |" at)
if(at EQUAL -1)
  message(FATAL_ERROR "bkn_estimation --quick did not print the table header")
endif()
foreach(file estimation.md estimation.csv estimation.gp)
  if(NOT EXISTS "${OUT}/${file}")
    message(FATAL_ERROR "bkn_estimation --quick did not write ${OUT}/${file}")
  endif()
endforeach()

# ctest smoke run of bkn_mlp on a few hundred real Fashion-MNIST images (CI's run of the demo):
# every normalization choice at a large and two micro-batch settings, 2 epochs. It must exit
# 0, print the table, and write the log, the table and the plot (when gnuplot is there); no
# accuracy is asserted (too few images). Usage:
#   cmake -DEXE=<bkn_mlp> -DDATA=<fashion-mnist folder> -DOUT=<folder> -P smoke.cmake
foreach(var EXE DATA OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "smoke.cmake: pass -D${var}=...")
  endif()
endforeach()
if(NOT EXISTS "${DATA}/train-images-idx3-ubyte.gz" AND NOT EXISTS "${DATA}/train-images-idx3-ubyte")
  message("skipped: Fashion-MNIST is not installed in ${DATA} (apt-get install dataset-fashion-mnist)")
  return()
endif()
file(REMOVE_RECURSE "${OUT}")
set(methods none,bn,bkn,bkn:dense,bkn:no-input-prior:q=0.2,bkn:identity:per-channel)
# bkn's other methods (include/bkn/methods), when bkn_mlp knows them.
execute_process(COMMAND "${EXE}" --help OUTPUT_VARIABLE help)
set(expected_runs 36)
if(help MATCHES "brn")
  string(APPEND methods ",brn,gn:groups=8,ln")
  set(expected_runs 54)
endif()
execute_process(
  COMMAND "${EXE}" --data "${DATA}" --out "${OUT}" --methods ${methods} --hidden 64,64
          --settings 32x32,32x2,4x2 --epochs 2 --train-limit 256 --test-limit 100
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "bkn_mlp exited with ${rc}")
endif()
string(FIND "${out}" "| method | (gradient batch, statistics batch) | test acc. % (moving stats) | test acc. % (batch stats) | s / epoch | seeds |" at)
if(at EQUAL -1)
  message(FATAL_ERROR "bkn_mlp did not print the table header")
endif()
string(FIND "${out}" "| bkn:identity:per-channel | (4, 2) |" at)
if(help MATCHES "brn")
  string(FIND "${out}" "| ln | (4, 2) |" at)
endif()
if(at EQUAL -1)
  message(FATAL_ERROR "bkn_mlp's table lacks the row of the last method and setting")
endif()
foreach(file epochs.csv summary.md summary.csv accuracy.gp)
  if(NOT EXISTS "${OUT}/${file}")
    message(FATAL_ERROR "bkn_mlp did not write ${OUT}/${file}")
  endif()
endforeach()
# Methods x 3 settings x 2 epochs, and the header.
file(STRINGS "${OUT}/epochs.csv" lines)
list(LENGTH lines count)
math(EXPR expected "${expected_runs} + 1")
if(NOT count EQUAL expected)
  message(FATAL_ERROR "epochs.csv has ${count} lines, expected ${expected}")
endif()
find_program(GNUPLOT gnuplot)
if(GNUPLOT AND NOT EXISTS "${OUT}/accuracy.png")
  message(FATAL_ERROR "gnuplot is installed but bkn_mlp did not write ${OUT}/accuracy.png")
endif()
# --replot gives the same accuracies from the log alone, and counts a run whose last epoch is
# missing (interrupted) as unfinished instead of reporting its earlier epoch.
file(STRINGS "${OUT}/summary.md" trained)
execute_process(COMMAND "${EXE}" --replot --out "${OUT}" --no-plot RESULT_VARIABLE rc
                OUTPUT_QUIET ERROR_VARIABLE err)
file(STRINGS "${OUT}/summary.md" replotted)
# Compare all but the time column (the log keeps seconds to 3 decimals).
foreach(var trained replotted)
  list(TRANSFORM ${var} REPLACE "\\| [^|]* \\| ([^|]*) \\|$" "| \\1 |")
endforeach()
if(NOT rc EQUAL 0 OR NOT trained STREQUAL replotted)
  message(FATAL_ERROR "--replot (exit ${rc}: ${err}) changed the table:\n${trained}\n---\n${replotted}")
endif()
list(REMOVE_AT lines -1)  # the last epoch of the last run: ln or bkn:identity at (4, 2)
list(JOIN lines "\n" cut)
file(WRITE "${OUT}/epochs.csv" "${cut}\n")
execute_process(COMMAND "${EXE}" --replot --out "${OUT}" --no-plot RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(FIND "${out}" " | (4, 2) | - | - | - | 0 (+1 diverged or unfinished) |" at)
if(NOT rc EQUAL 0 OR at EQUAL -1)
  message(FATAL_ERROR "--replot of an interrupted run (exit ${rc}):\n${out}${err}")
endif()

# A clear error for a bad command line, and for data that is not there.
execute_process(COMMAND "${EXE}" --settings 8x3 RESULT_VARIABLE rc ERROR_VARIABLE err
                OUTPUT_QUIET)
string(FIND "${err}" "the statistics batch must divide the gradient batch" at)
if(NOT rc EQUAL 2 OR at EQUAL -1)
  message(FATAL_ERROR "--settings 8x3: expected exit 2 and a message, got ${rc}: ${err}")
endif()
execute_process(COMMAND "${EXE}" --data "${OUT}/nowhere" RESULT_VARIABLE rc ERROR_VARIABLE err
                OUTPUT_QUIET)
string(FIND "${err}" "${OUT}/nowhere/train-images-idx3-ubyte.gz: no such file" at)
if(NOT rc EQUAL 1 OR at EQUAL -1)
  message(FATAL_ERROR "missing data: expected exit 1 and the file's name, got ${rc}: ${err}")
endif()

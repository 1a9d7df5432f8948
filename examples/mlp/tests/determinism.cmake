# ctest check that a seed reproduces a run: the same command twice gives the same per-epoch log
# (every column but the time), a run does not depend on the runs before it in the process, and
# another seed gives another log (so the comparison can fail). Usage:
#   cmake -DEXE=<bkn_mlp> -DDATA=<fashion-mnist folder> -DOUT=<folder> -P determinism.cmake
foreach(var EXE DATA OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "determinism.cmake: pass -D${var}=...")
  endif()
endforeach()
if(NOT EXISTS "${DATA}/train-images-idx3-ubyte.gz" AND NOT EXISTS "${DATA}/train-images-idx3-ubyte")
  message("skipped: Fashion-MNIST is not installed in ${DATA} (apt-get install dataset-fashion-mnist)")
  return()
endif()
file(REMOVE_RECURSE "${OUT}")

# Runs bkn_mlp into OUT/<name> and sets <name> to its log's lines without the last column
# (epoch_seconds); `threads` threads for Eigen and bkn.
function(run name seed methods threads)
  execute_process(
    COMMAND "${EXE}" --data "${DATA}" --out "${OUT}/${name}" --methods ${methods}
            --settings 32x2 --epochs 2 --train-limit 320 --test-limit 100 --hidden 48,32
            --seeds ${seed} --threads ${threads} --no-plot
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "bkn_mlp (${name}) exited with ${rc}:\n${out}${err}")
  endif()
  file(STRINGS "${OUT}/${name}/epochs.csv" lines)
  set(kept "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE ",[^,]*$" "" line "${line}")
    list(APPEND kept "${line}")
  endforeach()
  set(${name} "${kept}" PARENT_SCOPE)
endfunction()

foreach(threads 1 2)
  run(first 7 bn,bkn,bkn:dense ${threads})
  run(again 7 bn,bkn,bkn:dense ${threads})
  if(NOT first STREQUAL again)
    message(FATAL_ERROR "${threads} thread(s): seed 7 twice gave two logs:\n${first}\n---\n${again}")
  endif()
  # bkn:dense alone must give the lines it gave after two other runs in the same process.
  run(alone 7 bkn:dense ${threads})
  list(FILTER first INCLUDE REGEX "^bkn:dense,")
  list(FILTER alone INCLUDE REGEX "^bkn:dense,")
  if(NOT first STREQUAL alone)
    message(FATAL_ERROR "${threads} thread(s): bkn:dense depends on the runs before it:\n${first}\n---\n${alone}")
  endif()
endforeach()
run(other 8 bn,bkn,bkn:dense 1)
list(FILTER other INCLUDE REGEX "^bkn:dense,")
if(first STREQUAL other)
  message(FATAL_ERROR "seeds 7 and 8 gave the same log: the comparison above proves nothing")
endif()
message("same seed, same log (1 and 2 threads); another seed, another log")

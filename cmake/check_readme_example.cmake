# Fails unless README contains the file EXAMPLE verbatim (run with cmake -P).
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "${example}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "${README} does not contain ${EXAMPLE} verbatim: update the README's code block")
endif()

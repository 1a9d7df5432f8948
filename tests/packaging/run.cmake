# Driven by the packaging_* ctest tests (see tests/CMakeLists.txt):
#   STEP=install:  cmake --install BUILD_DIR into a fresh PREFIX
#   STEP=consumer: configure, build (which runs it) tests/packaging/CONSUMER in a fresh BINARY_DIR
cmake_minimum_required(VERSION 3.20)

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}") # no stale headers from earlier runs
  execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}"
                          --config "${CONFIG}"
                  COMMAND_ERROR_IS_FATAL ANY)
elseif(STEP STREQUAL "consumer")
  set(args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
      "-DCMAKE_BUILD_TYPE=${CONFIG}" "-DCMAKE_PREFIX_PATH=${PREFIX}"
      "-DBKN_SOURCE_DIR=${BKN_SOURCE_DIR}" "-DWITH_EIGEN=${WITH_EIGEN}"
      -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF --no-warn-unused-cli)
  if(GENERATOR_PLATFORM)
    list(APPEND args -A "${GENERATOR_PLATFORM}")
  endif()
  if(GENERATOR_TOOLSET)
    list(APPEND args -T "${GENERATOR_TOOLSET}")
  endif()
  if(MAKE_PROGRAM)
    list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  file(REMOVE_RECURSE "${BINARY_DIR}") # a stale cache could hide a broken config
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${CMAKE_CURRENT_LIST_DIR}/${CONSUMER}"
                          -B "${BINARY_DIR}" ${args}
                  COMMAND_ERROR_IS_FATAL ANY)
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --config "${CONFIG}"
                  COMMAND_ERROR_IS_FATAL ANY)
else()
  message(FATAL_ERROR "run.cmake: unknown STEP '${STEP}'")
endif()

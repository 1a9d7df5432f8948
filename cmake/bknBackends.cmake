# How a backend plugs in. backends/<name>/CMakeLists.txt does, in order:
#   bkn_backend_option(<name> "<what it is>")  # optional backends only: BKN_ENABLE_<NAME>
#   ...find_package() its dependencies; on failure: bkn_backend_disabled(<name> "<why>") + return()
#   bkn_add_backend(<name> [LINK <targets>...] [DEPENDENCIES "<find_package args>"...]
#                   [DETAILS "<status text>"])
# DEPENDENCIES are replayed by the installed bknConfig.cmake, so they must mirror LINK.

# Cache option BKN_ENABLE_<NAME>: AUTO (use if found), ON (fail if not found), OFF.
# Sets BKN_<NAME>_MODE to AUTO, ON or OFF (any CMake boolean spelling is accepted).
function(bkn_backend_option name description)
  string(TOUPPER "${name}" upper)
  set(BKN_ENABLE_${upper} AUTO CACHE STRING "${description}: AUTO, ON (required) or OFF")
  set_property(CACHE BKN_ENABLE_${upper} PROPERTY STRINGS AUTO ON OFF)
  string(TOUPPER "${BKN_ENABLE_${upper}}" mode)
  if(mode MATCHES "^(ON|YES|Y|TRUE|1)$")
    set(mode ON)
  elseif(mode MATCHES "^(OFF|NO|N|FALSE|0)$")
    set(mode OFF)
  elseif(NOT mode STREQUAL "AUTO")
    message(FATAL_ERROR "bkn: BKN_ENABLE_${upper} must be AUTO, ON or OFF, not '${mode}'")
  endif()
  set(BKN_${upper}_MODE ${mode} PARENT_SCOPE)
endfunction()

# Reports the backend as OFF, or stops the configure when the user asked for it with ON.
function(bkn_backend_disabled name reason)
  string(TOUPPER "${name}" upper)
  if(BKN_${upper}_MODE STREQUAL "ON")
    message(FATAL_ERROR "bkn: BKN_ENABLE_${upper}=ON but the ${name} backend is unavailable: "
                        "${reason}")
  endif()
  message(STATUS "bkn: ${name} backend OFF (${reason})")
endfunction()

function(bkn_add_backend name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "DETAILS" "LINK;DEPENDENCIES")
  set(include_dir "${CMAKE_CURRENT_SOURCE_DIR}/include")
  if(NOT IS_DIRECTORY "${include_dir}")
    bkn_backend_disabled(${name} "no headers in ${include_dir}")
    return()
  endif()

  add_library(bkn_${name} INTERFACE)
  add_library(bkn::${name} ALIAS bkn_${name})
  set_target_properties(bkn_${name} PROPERTIES EXPORT_NAME ${name})
  target_include_directories(bkn_${name} INTERFACE
    $<BUILD_INTERFACE:${include_dir}>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  target_link_libraries(bkn_${name} INTERFACE bkn::bkn ${arg_LINK})

  set_property(GLOBAL APPEND PROPERTY BKN_BACKENDS ${name})
  set_property(GLOBAL PROPERTY BKN_BACKEND_${name}_INCLUDE_DIR "${include_dir}")
  set_property(GLOBAL PROPERTY BKN_BACKEND_${name}_DEPENDENCIES "${arg_DEPENDENCIES}")

  if(BKN_INSTALL)
    # A separate export set per backend: consumers load (and need the dependencies of) only
    # the backends they ask for.
    install(TARGETS bkn_${name} EXPORT bkn-${name}-targets)
    install(EXPORT bkn-${name}-targets NAMESPACE bkn:: DESTINATION ${BKN_INSTALL_CMAKEDIR})
    install(DIRECTORY include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
            FILES_MATCHING PATTERN "*.hpp")
  endif()

  if(arg_DETAILS)
    message(STATUS "bkn: ${name} backend ON (${arg_DETAILS})")
  else()
    message(STATUS "bkn: ${name} backend ON")
  endif()
endfunction()

# ctest driver for the consumer_find_package test (cmake -P script):
#   1. cmake --install <TQ_BUILD_DIR> --prefix <TQ_SCRATCH_DIR>/prefix
#   2. configure tests/consumer with CMAKE_PREFIX_PATH=<prefix>
#   3. build it and run the program.
# Inputs (-D): TQ_BUILD_DIR, TQ_CONSUMER_SOURCE_DIR, TQ_SCRATCH_DIR,
# TQ_GENERATOR, TQ_CXX_COMPILER, TQ_BUILD_TYPE, TQ_SANITIZE. A library built
# with sanitizers needs their runtimes at the consumer's link, so TQ_SANITIZE
# adds the same -fsanitize flags there.
cmake_minimum_required(VERSION 3.25)

foreach(var TQ_BUILD_DIR TQ_CONSUMER_SOURCE_DIR TQ_SCRATCH_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

set(prefix "${TQ_SCRATCH_DIR}/prefix")
set(build "${TQ_SCRATCH_DIR}/build")
# Start clean every time: a stale prefix could hide a file the install lost.
file(REMOVE_RECURSE "${TQ_SCRATCH_DIR}")
file(MAKE_DIRECTORY "${TQ_SCRATCH_DIR}")

function(run_step what)
  list(JOIN ARGN " " shown)
  message(STATUS "consumer: ${what}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer: ${what} failed (${rc})")
  endif()
endfunction()

run_step("install" "${CMAKE_COMMAND}" --install "${TQ_BUILD_DIR}" --prefix "${prefix}")

set(configure_args
  -S "${TQ_CONSUMER_SOURCE_DIR}" -B "${build}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  # Only the installed package may satisfy find_package, not a package
  # registry entry or a system-wide copy that happens to be around.
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(TQ_GENERATOR)
  list(APPEND configure_args -G "${TQ_GENERATOR}")
endif()
if(TQ_CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${TQ_CXX_COMPILER}")
endif()
if(TQ_BUILD_TYPE)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${TQ_BUILD_TYPE}")
endif()
if(TQ_SANITIZE)
  set(san "-fsanitize=address,undefined -fno-omit-frame-pointer")
  list(APPEND configure_args "-DCMAKE_CXX_FLAGS=${san}"
                             "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined")
endif()

run_step("configure" "${CMAKE_COMMAND}" ${configure_args})
run_step("build" "${CMAKE_COMMAND}" --build "${build}")
find_program(consumer_exe consumer PATHS "${build}" NO_DEFAULT_PATH REQUIRED)
run_step("run" "${consumer_exe}")

// Argument checks of the torch bindings. A failed check throws std::invalid_argument, which
// pybind11 turns into Python's ValueError by itself. Not c10::ValueError (TORCH_CHECK_VALUE):
// on the H100 machine (torch 2.11) a c10::ValueError thrown inside an extension call killed
// the interpreter with a segfault, even when caught and rethrown as pybind11::value_error,
// while c10::NotImplementedError from the same function reached Python fine.
#pragma once

#include <c10/util/StringUtil.h>

#include <stdexcept>

// ARG_ERROR_CHECK("flash_attn: ", cond, "q must be ...", x): the message is c10::str of the rest.
#define ARG_ERROR_CHECK(prefix, cond, ...)                                   \
  do {                                                                       \
    if (!(cond)) { throw std::invalid_argument(::c10::str(prefix, __VA_ARGS__)); } \
  } while (0)

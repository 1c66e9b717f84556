// Argument checks of the torch bindings. A failed check throws std::invalid_argument, which
// pybind11 turns into Python's ValueError by itself.
//
// Floating-point values in a message are formatted with snprintf, never with
// std::ostream: on the H100 machine (torch 2.11, extensions built by g++ 13.3), an
// extension that writes a double into a std::ostringstream after `import torch` crashed
// the interpreter (segfault), while integers, strings and dtypes formatted fine; a
// minimal pybind11 module reproduced it (benchmarks/tune/repro_value_error.py shows the
// case through our bindings). c10::str uses an ostringstream, so doubles are turned into
// strings first.
#pragma once

#include <c10/util/StringUtil.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace arg_error {

template <typename T>
decltype(auto) printable(const T &x) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", double(x));
    return std::string(buf);
  } else {
    return (x);  // a const reference: c10::str streams it as before
  }
}

template <typename... Args>
std::string message(const Args &...args) {
  return ::c10::str(printable(args)...);
}

}  // namespace arg_error

// ARG_ERROR_CHECK("flash_attn: ", cond, "q must be ...", x): the message joins the rest.
#define ARG_ERROR_CHECK(prefix, cond, ...)                                                       \
  do {                                                                                           \
    if (!(cond)) { throw std::invalid_argument(::arg_error::message(prefix, __VA_ARGS__)); } \
  } while (0)

// Argument checks of the torch bindings. A failed check throws std::invalid_argument, which
// pybind11 turns into Python's ValueError by itself.
//
// Numbers in a message are formatted with snprintf, never with std::ostream: on the H100
// machine (torch 2.11, extensions built by g++ 13.3), an extension that wrote a double, an
// int64_t or an IntArrayRef (a list of int64_t) into a std::ostringstream after
// `import torch` crashed the interpreter (segfault), while int, strings and dtypes
// formatted fine. A minimal pybind11 module reproduced the double case, and
// benchmarks/tune/repro_value_error.py shows each case through our bindings. c10::str uses
// an ostringstream, so every number and list of numbers is turned into a string first.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/StringUtil.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace arg_error {

inline std::string format_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return std::string(buf);
}
inline std::string format_number(long long x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", x);
  return std::string(buf);
}
inline std::string format_number(unsigned long long x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%llu", x);
  return std::string(buf);
}

template <typename T>
struct is_number_list : std::false_type {};
template <typename T>
struct is_number_list<c10::ArrayRef<T>> : std::is_arithmetic<T> {};

template <typename T>
decltype(auto) printable(const T &x) {
  if constexpr (std::is_floating_point_v<T>) {
    return format_number(double(x));
  } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>) {
    if constexpr (std::is_signed_v<T>) {
      return format_number(static_cast<long long>(x));
    } else {
      return format_number(static_cast<unsigned long long>(x));
    }
  } else if constexpr (is_number_list<T>::value) {  // "[2, 64, 8]", as c10 prints sizes
    std::string s = "[";
    for (size_t i = 0; i < x.size(); ++i) {
      if (i > 0) { s += ", "; }
      s += std::string(printable(x[i]));
    }
    return s + "]";
  } else {
    return (x);  // a const reference: c10::str streams it as before (strings, dtypes)
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

// Binding helper (torch bindings only): argument errors raised with TORCH_CHECK_VALUE
// (c10::ValueError) reach Python as ValueError through pybind11's own built-in exception,
// not through the translators torch registers. On the H100 machine (torch 2.11) one
// c10::ValueError thrown out of an extension call crashed the interpreter, while other
// c10 errors were translated fine; converting here does not depend on that machinery.
#pragma once

#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <utility>

template <auto Fn>
struct PyValueErrors;

// PyValueErrors<&f>::call has f's signature; bind it instead of f.
template <typename R, typename... Args, R (*Fn)(Args...)>
struct PyValueErrors<Fn> {
  static R call(Args... args) {
    try {
      return Fn(std::forward<Args>(args)...);
    } catch (const c10::ValueError &e) {
      throw pybind11::value_error(e.what_without_backtrace());
    }
  }
};

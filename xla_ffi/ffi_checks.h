// Checks of the buffers XLA hands an FFI handler, shared by the handlers (ffi_handlers.cc, streamed_lane.cc):
// each returns an error message naming the operation and the argument, or "" when the buffer is as expected.
#pragma once

#include <string>

#include "xla/ffi/api/ffi.h"

namespace fiddler {

namespace ffi = xla::ffi;

inline const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U16: return "uint16";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

inline std::string Shape(const ffi::AnyBuffer& b) {
  std::string s = "(";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

// Checks dtype and rank of one argument; returns an error message or "".
inline std::string Check(const char* op, const char* name, const ffi::AnyBuffer& b, ffi::DataType want,
                         size_t rank) {
  if (b.element_type() != want)
    return std::string(op) + ": " + name + " must be " + DtypeName(want) + ", got " + DtypeName(b.element_type());
  if (b.dimensions().size() != rank)
    return std::string(op) + ": " + name + " must have rank " + std::to_string(rank) + ", got shape " + Shape(b);
  return "";
}

}  // namespace fiddler

// XLA FFI glue: decode and check the buffers XLA hands us, then call the compute API (expert_ffn.h).
// Every check names the argument; nothing is indexed before it is checked.
#include <cstdint>
#include <string>

#include "capi.h"
#include "expert_ffn.h"
#include "ffi_checks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using fiddler::Check;
using fiddler::DtypeName;
using fiddler::Shape;

std::string CheckOut(const char* op, const ffi::AnyBuffer& b) {
  if (b.element_type() != ffi::DataType::BF16 && b.element_type() != ffi::DataType::F32)
    return std::string(op) + ": output must be bfloat16 or float32, got " + DtypeName(b.element_type());
  if (b.dimensions().size() != 2) return std::string(op) + ": output must have rank 2, got shape " + Shape(b);
  return "";
}

ffi::Error Invalid(const std::string& msg) { return ffi::Error::InvalidArgument(msg); }

ffi::Error ExpertFfnImpl(ffi::AnyBuffer x, ffi::AnyBuffer w1, ffi::AnyBuffer w3, ffi::AnyBuffer w2,
                         ffi::Result<ffi::AnyBuffer> y) {
  const char* op = "expert_ffn";
  for (auto [name, buf] : {std::pair<const char*, const ffi::AnyBuffer*>{"x", &x}, {"w1", &w1}, {"w3", &w3},
                           {"w2", &w2}}) {
    std::string e = Check(op, name, *buf, ffi::DataType::BF16, 2);
    if (!e.empty()) return Invalid(e);
  }
  std::string e = CheckOut(op, *y);
  if (!e.empty()) return Invalid(e);
  const int64_t n = x.dimensions()[0], hidden = x.dimensions()[1], ffn = w1.dimensions()[0];
  if (w1.dimensions()[1] != hidden)
    return Invalid("expert_ffn: w1 has shape " + Shape(w1) + " but x has hidden size " + std::to_string(hidden) +
                   " (w1 must be [ffn, hidden])");
  if (w3.dimensions()[0] != ffn || w3.dimensions()[1] != hidden)
    return Invalid("expert_ffn: w3 has shape " + Shape(w3) + ", expected " + Shape(w1) + " like w1");
  if (w2.dimensions()[0] != hidden || w2.dimensions()[1] != ffn)
    return Invalid("expert_ffn: w2 has shape " + Shape(w2) + ", expected (" + std::to_string(hidden) + ", " +
                   std::to_string(ffn) + ") = [hidden, ffn]");
  if (y->dimensions()[0] != n || y->dimensions()[1] != hidden)
    return Invalid("expert_ffn: output has shape " + Shape(*y) + ", expected " + Shape(x));
  const char* err = fiddler::ExpertFfn(static_cast<const uint16_t*>(x.untyped_data()), n, hidden, ffn,
                                       static_cast<const uint16_t*>(w1.untyped_data()),
                                       static_cast<const uint16_t*>(w3.untyped_data()),
                                       static_cast<const uint16_t*>(w2.untyped_data()), y->untyped_data(),
                                       y->element_type() == ffi::DataType::F32);
  return err ? Invalid(err) : ffi::Error::Success();
}

ffi::Error GroupedExpertFfnImpl(ffi::AnyBuffer x, ffi::AnyBuffer token_idx, ffi::AnyBuffer expert_idx,
                                ffi::AnyBuffer weights, ffi::AnyBuffer w1, ffi::AnyBuffer w3, ffi::AnyBuffer w2,
                                ffi::Result<ffi::AnyBuffer> y) {
  const char* op = "grouped_expert_ffn";
  std::string e;
  if (!(e = Check(op, "hidden", x, ffi::DataType::BF16, 2)).empty()) return Invalid(e);
  if (!(e = Check(op, "token_idx", token_idx, ffi::DataType::S32, 1)).empty()) return Invalid(e);
  if (!(e = Check(op, "expert_idx", expert_idx, ffi::DataType::S32, 1)).empty()) return Invalid(e);
  if (!(e = Check(op, "weights", weights, ffi::DataType::F32, 1)).empty()) return Invalid(e);
  if (!(e = Check(op, "w1", w1, ffi::DataType::BF16, 3)).empty()) return Invalid(e);
  if (!(e = Check(op, "w3", w3, ffi::DataType::BF16, 3)).empty()) return Invalid(e);
  if (!(e = Check(op, "w2", w2, ffi::DataType::BF16, 3)).empty()) return Invalid(e);
  if (!(e = CheckOut(op, *y)).empty()) return Invalid(e);
  const int64_t T = x.dimensions()[0], hidden = x.dimensions()[1];
  const int64_t A = token_idx.dimensions()[0];
  const int64_t E = w1.dimensions()[0], ffn = w1.dimensions()[1];
  if (expert_idx.dimensions()[0] != A)
    return Invalid("grouped_expert_ffn: expert_idx has shape " + Shape(expert_idx) + " but token_idx has " +
                   Shape(token_idx));
  if (weights.dimensions()[0] != A)
    return Invalid("grouped_expert_ffn: weights has shape " + Shape(weights) + " but token_idx has " +
                   Shape(token_idx));
  if (w1.dimensions()[2] != hidden)
    return Invalid("grouped_expert_ffn: w1 has shape " + Shape(w1) + " but hidden has hidden size " +
                   std::to_string(hidden) + " (w1 must be [E, ffn, hidden])");
  if (w3.dimensions()[0] != E || w3.dimensions()[1] != ffn || w3.dimensions()[2] != hidden)
    return Invalid("grouped_expert_ffn: w3 has shape " + Shape(w3) + ", expected " + Shape(w1) + " like w1");
  if (w2.dimensions()[0] != E || w2.dimensions()[1] != hidden || w2.dimensions()[2] != ffn)
    return Invalid("grouped_expert_ffn: w2 has shape " + Shape(w2) + ", expected (" + std::to_string(E) + ", " +
                   std::to_string(hidden) + ", " + std::to_string(ffn) + ") = [E, hidden, ffn]");
  if (y->dimensions()[0] != T || y->dimensions()[1] != hidden)
    return Invalid("grouped_expert_ffn: output has shape " + Shape(*y) + ", expected " + Shape(x));
  const char* err = fiddler::GroupedExpertFfn(
      static_cast<const uint16_t*>(x.untyped_data()), T, hidden, ffn, E,
      static_cast<const int32_t*>(token_idx.untyped_data()), static_cast<const int32_t*>(expert_idx.untyped_data()),
      static_cast<const float*>(weights.untyped_data()), A, static_cast<const uint16_t*>(w1.untyped_data()),
      static_cast<const uint16_t*>(w3.untyped_data()), static_cast<const uint16_t*>(w2.untyped_data()),
      y->untyped_data(), y->element_type() == ffi::DataType::F32);
  return err ? Invalid(err) : ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerExpertFfn, ExpertFfnImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerGroupedExpertFfn, GroupedExpertFfnImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

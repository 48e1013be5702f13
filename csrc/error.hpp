// One exception type for every failure of the native core; the bindings map it to pydetox.errors.NativeError.
#pragma once
#include <stdexcept>
#include <string>

namespace pydetox {

class Error : public std::runtime_error {
  public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace pydetox

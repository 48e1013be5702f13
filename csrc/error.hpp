// One exception type for every failure of the native core; the bindings map it to pydetox.errors.NativeError.
#pragma once
#include <stdexcept>
#include <string>

namespace pydetox {

class Error : public std::runtime_error {
  public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Writing the output failed (full disk, file too large, I/O error); the bindings map it to pydetox.errors.OutputError.
class IoError : public Error {
  public:
    explicit IoError(const std::string& what) : Error(what) {}
};

}  // namespace pydetox

// The few libggml entry points pydetox uses, resolved at run time from the libggml-base that llama-cpp-python
// installs, so the quantizers are exactly llama.cpp's own and pydetox needs no ggml headers at build time.
//
// The declarations mirror ggml/include/ggml.h of llama.cpp commit 0c1e57098bba (vendored by llama-cpp-python
// 0.3.36). `load` checks the struct layout against the block sizes the caller expects (gguf.GGML_QUANT_SIZES), so
// an ABI change in a later libggml is refused instead of silently misread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace pydetox::ggml {

using to_float_t = void (*)(const void* x, float* y, int64_t k);
using from_float_t = void (*)(const float* x, void* y, int64_t k);

struct TypeTraits {  // struct ggml_type_traits
    const char* type_name;
    int64_t blck_size;
    int64_t blck_size_interleave;
    size_t type_size;
    bool is_quantized;
    to_float_t to_float;
    from_float_t from_float_ref;
};

// A ggml type id, as stored in GGUF tensor infos (enum ggml_type).
using Type = int;

struct Api {
    const TypeTraits* (*get_type_traits)(Type type);
    size_t (*quantize_chunk)(Type type, const float* src, void* dst, int64_t start, int64_t nrows, int64_t n_per_row,
                             const float* imatrix);
    bool (*quantize_requires_imatrix)(Type type);
    void (*quantize_init)(Type type);
    bool (*validate_row_data)(Type type, const void* data, size_t nbytes);
    size_t (*row_size)(Type type, int64_t ne);
};

// Opens `path` (libggml-base.so) and resolves the entry points. Throws pydetox::Error naming what is missing.
void load(const std::string& path);
bool loaded();
const Api& api();  // throws when load() has not succeeded

// Traits of a type id, or an Error naming the id when libggml does not know it or cannot convert it to float.
const TypeTraits& traits(Type type);
// Bytes of one row of `n` elements; throws when `n` is not a multiple of the block size.
size_t row_bytes(Type type, int64_t n);
// Names the type, for error messages.
std::string type_name(Type type);

}  // namespace pydetox::ggml

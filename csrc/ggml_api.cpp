#include "ggml_api.hpp"

#include <dlfcn.h>

#include <mutex>

#include "error.hpp"

namespace pydetox::ggml {
namespace {

// GGML_TYPE_COUNT at the pinned llama.cpp commit; ids at or above it are never passed to libggml.
constexpr Type kTypeCount = 43;

Api g_api{};
bool g_loaded = false;
std::mutex g_mutex;

template <typename F>
void resolve(void* handle, const char* name, F& out, const std::string& path) {
    void* sym = dlsym(handle, name);
    if (sym == nullptr) {
        throw Error("libggml at " + path + " does not export " + name +
                    "; expected the libggml-base of llama-cpp-python 0.3.36");
    }
    out = reinterpret_cast<F>(sym);
}

}  // namespace

void load(const std::string& path) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_loaded) return;
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        const char* err = dlerror();
        throw Error("cannot open libggml at " + path + ": " + (err ? err : "unknown error"));
    }
    Api api{};
    resolve(handle, "ggml_get_type_traits", api.get_type_traits, path);
    resolve(handle, "ggml_quantize_chunk", api.quantize_chunk, path);
    resolve(handle, "ggml_quantize_requires_imatrix", api.quantize_requires_imatrix, path);
    resolve(handle, "ggml_quantize_init", api.quantize_init, path);
    resolve(handle, "ggml_validate_row_data", api.validate_row_data, path);
    resolve(handle, "ggml_row_size", api.row_size, path);
    g_api = api;
    g_loaded = true;
}

bool loaded() { return g_loaded; }

const Api& api() {
    if (!g_loaded) throw Error("libggml is not loaded; call pydetox.ggml.load() first");
    return g_api;
}

const TypeTraits& traits(Type type) {
    if (type < 0 || type >= kTypeCount) {
        throw Error("unknown ggml type id " + std::to_string(type) + " (expected 0.." + std::to_string(kTypeCount - 1) +
                    ")");
    }
    const TypeTraits* t = api().get_type_traits(type);
    if (t == nullptr || t->blck_size <= 0 || t->type_size == 0) {
        throw Error("ggml type id " + std::to_string(type) + " is not a tensor type this libggml supports");
    }
    return *t;
}

size_t row_bytes(Type type, int64_t n) {
    const TypeTraits& t = traits(type);
    if (n <= 0 || n % t.blck_size != 0) {
        throw Error("a row of " + std::to_string(n) + " elements cannot be stored as " + t.type_name +
                    ": rows must be a positive multiple of its block size " + std::to_string(t.blck_size));
    }
    return static_cast<size_t>(n / t.blck_size) * t.type_size;
}

std::string type_name(Type type) {
    try {
        return traits(type).type_name;
    } catch (const Error&) {
        return "type#" + std::to_string(type);
    }
}

}  // namespace pydetox::ggml

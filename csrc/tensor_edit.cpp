#include "tensor_edit.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <string>

#include "error.hpp"
#include "kernels.hpp"
#include "parallel.hpp"

namespace pydetox {
namespace {

// ggml type ids (enum ggml_type) that ggml_quantize_chunk can write. Any other id reaches `assert(false)` and
// then a GGML_ASSERT abort inside libggml, so it is refused here first (ggml.c, ggml_quantize_chunk).
constexpr ggml::Type kF32 = 0;
constexpr ggml::Type kQuantizable[] = {0,  1,  2,  3,  6,  7,  8,  10, 11, 12, 13, 14, 16, 17, 18, 19,
                                       20, 21, 22, 23, 29, 30, 34, 35, 39, 40, 41};

using Clock = std::chrono::steady_clock;

struct Workspace {
    std::vector<float> w, w0;
    std::vector<uint8_t> out;
};
thread_local Workspace g_ws;

// resize without shrinking capacity: after the largest tensor, no more allocations
template <typename T>
T* grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Sum over rows of f(row index), accumulated in double per row then summed in row order: deterministic for any
// thread count.
template <typename F>
double row_sum(int64_t rows, int nthreads, F&& f) {
    std::vector<double> part(static_cast<size_t>(rows));
    parallel_for(rows, nthreads, 64, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) part[r] = f(r);
    });
    return std::accumulate(part.begin(), part.end(), 0.0);
}

double frob(const float* A, int64_t rows, int64_t cols, int nthreads) {
    return std::sqrt(row_sum(rows, nthreads, [&](int64_t r) {
        double s = 0.0;
        const float* a = A + r * cols;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < cols; ++i) s += double(a[i]) * a[i];
        return s;
    }));
}

double frob_diff(const float* A, const float* B, int64_t rows, int64_t cols, int nthreads) {
    return std::sqrt(row_sum(rows, nthreads, [&](int64_t r) {
        double s = 0.0;
        const float* a = A + r * cols;
        const float* b = B + r * cols;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < cols; ++i) {
            const double d = double(a[i]) - b[i];
            s += d * d;
        }
        return s;
    }));
}

bool is_projection(const Op& op) { return op.kind == OpKind::ProjectOut || op.kind == OpKind::ProjectIn; }

// Basis coordinates of W for a projection op: k x cols (out side) or rows x k (in side), flattened.
std::vector<float> coordinates(const float* W, int64_t rows, int64_t cols, const Op& op, int nthreads) {
    if (op.kind == OpKind::ProjectOut) {
        std::vector<float> C(static_cast<size_t>(op.k * cols));
        kernels::gram_out(W, rows, cols, op.a, op.k, C.data(), nthreads);
        return C;
    }
    std::vector<float> D(static_cast<size_t>(rows * op.k));
    kernels::gram_in(W, rows, cols, op.a, op.k, D.data(), nthreads);
    return D;
}

// Index of the basis direction that a flat coordinate belongs to.
int64_t direction_of(const Op& op, size_t idx, int64_t cols) {
    return op.kind == OpKind::ProjectOut ? static_cast<int64_t>(idx) / cols : static_cast<int64_t>(idx) % op.k;
}

// ||coords - g * ref|| with g per direction.
double residual(const std::vector<float>& coords, const std::vector<float>& ref, const Op& op, int64_t cols) {
    double s = 0.0;
    for (size_t i = 0; i < coords.size(); ++i) {
        const double g = op.gain ? op.gain[direction_of(op, i, cols)] : 0.0;
        const double d = coords[i] - g * ref[i];
        s += d * d;
    }
    return std::sqrt(s);
}

double removed_norm(const std::vector<float>& ref, const Op& op, int64_t cols) {
    double s = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double g = op.gain ? op.gain[direction_of(op, i, cols)] : 0.0;
        const double d = (1.0 - g) * ref[i];
        s += d * d;
    }
    return std::sqrt(s);
}

void check_finite(const float* W, int64_t rows, int64_t cols, int nthreads, const char* what) {
    const double bad = row_sum(rows, nthreads, [&](int64_t r) {
        const float* w = W + r * cols;
        // x * 0 is 0 for every finite x and NaN for NaN and inf: one branch-free pass the compiler vectorizes.
        float probe = 0.f;
#pragma omp simd reduction(+ : probe)
        for (int64_t i = 0; i < cols; ++i) probe += w[i] * 0.f;
        return probe == 0.f ? 0.0 : 1.0;
    });
    if (bad > 0) {
        throw Error(std::string(what) + ": " + std::to_string(static_cast<int64_t>(bad)) +
                    " rows hold NaN or inf values");
    }
}

}  // namespace

void check_quantizable(ggml::Type type, int64_t cols) {
    bool ok = false;
    for (ggml::Type t : kQuantizable) ok |= (t == type);
    if (!ok) {
        throw Error("cannot quantize to " + ggml::type_name(type) +
                    ": libggml has no quantizer for it (use one of the types llama-quantize writes)");
    }
    ggml::row_bytes(type, cols);  // throws when cols is not a multiple of the block size
}

void dequantize(const void* src, ggml::Type type, int64_t rows, int64_t cols, float* dst, int nthreads) {
    const size_t rb = ggml::row_bytes(type, cols);
    const auto* s = static_cast<const uint8_t*>(src);
    if (type == kF32) {
        parallel_for(rows, nthreads, 256, [&](int64_t b, int64_t e) {
            std::memcpy(dst + b * cols, s + b * rb, static_cast<size_t>(e - b) * rb);
        });
        return;
    }
    const ggml::to_float_t to_float = ggml::traits(type).to_float;
    if (to_float == nullptr) throw Error("libggml cannot dequantize " + ggml::type_name(type));
    parallel_for(rows, nthreads, 16, [&](int64_t b, int64_t e) { to_float(s + b * rb, dst + b * cols, (e - b) * cols); });
}

void quantize(const float* src, ggml::Type type, int64_t rows, int64_t cols, const float* imatrix, void* dst,
              int nthreads) {
    check_quantizable(type, cols);
    const ggml::Api& g = ggml::api();
    if (imatrix == nullptr && g.quantize_requires_imatrix(type)) {
        throw Error("quantizing to " + ggml::type_name(type) +
                    " needs an importance matrix; pass one (--imatrix) or choose another type");
    }
    g.quantize_init(type);  // allocates the IQ grids once, before threads race for them
    parallel_for(rows, nthreads, 1, [&](int64_t b, int64_t e) {
        g.quantize_chunk(type, src, dst, b * cols, e - b, cols, imatrix);
    });
}

void apply_ops(float* W, int64_t rows, int64_t cols, const std::vector<Op>& ops, int nthreads) {
    for (const Op& op : ops) {
        switch (op.kind) {
            case OpKind::ProjectOut:
                kernels::project_out(W, rows, cols, op.a, op.k, op.gain, nthreads);
                break;
            case OpKind::ProjectIn:
                kernels::project_in(W, rows, cols, op.a, op.k, op.gain, nthreads);
                break;
            case OpKind::LowRank:
                kernels::low_rank(W, rows, cols, op.a, op.b, op.k, nthreads);
                break;
            case OpKind::ScaleRows:
                kernels::scale_rows(W, rows, cols, op.a, nthreads);
                break;
            case OpKind::ScaleCols:
                kernels::scale_cols(W, rows, cols, op.a, nthreads);
                break;
            case OpKind::AddRows:
                kernels::add_rows(W, rows, cols, op.a, op.b, op.k, nthreads);
                break;
            default:
                throw Error("unknown edit kind " + std::to_string(static_cast<int>(op.kind)));
        }
    }
}

TensorStats process_tensor(const void* src, ggml::Type src_type, int64_t rows, int64_t cols,
                           const std::vector<Op>& ops, ggml::Type dst_type, const float* imatrix, void* dst,
                           int nthreads, bool verify) {
    if (rows <= 0 || cols <= 0) throw Error("tensor shape must be positive, got " + std::to_string(rows) + " x " +
                                            std::to_string(cols));
    const size_t src_bytes = static_cast<size_t>(rows) * ggml::row_bytes(src_type, cols);
    check_quantizable(dst_type, cols);
    if (!ggml::api().validate_row_data(src_type, src, src_bytes)) {
        throw Error("input tensor data is invalid for " + ggml::type_name(src_type) +
                    " (NaN/inf values or corrupt block scales); the file is damaged");
    }
    TensorStats st;
    st.ops.resize(ops.size());
    const size_t n = static_cast<size_t>(rows * cols);

    auto t0 = Clock::now();
    float* W = grow(g_ws.w, n);
    dequantize(src, src_type, rows, cols, W, nthreads);
    st.dequantize_s = seconds_since(t0);

    const bool measure = verify && !ops.empty();
    float* W0 = nullptr;
    std::vector<std::vector<float>> ref(ops.size());
    if (measure) {
        t0 = Clock::now();
        W0 = grow(g_ws.w0, n);
        std::memcpy(W0, W, n * sizeof(float));
        st.norm_orig = frob(W0, rows, cols, nthreads);
        for (size_t i = 0; i < ops.size(); ++i) {
            if (!is_projection(ops[i])) continue;
            ref[i] = coordinates(W0, rows, cols, ops[i], nthreads);
            st.ops[i].removed = removed_norm(ref[i], ops[i], cols);
        }
        st.verify_s += seconds_since(t0);
    }

    t0 = Clock::now();
    // Without verify, the norms before and after bound the edit's size from below (| ||W|| - ||W0|| | <=
    // ||W - W0||), which is enough for the caller to refuse an edit far outside any plausible strength.
    if (!ops.empty() && !measure) st.norm_orig = frob(W, rows, cols, nthreads);
    apply_ops(W, rows, cols, ops, nthreads);
    if (!ops.empty()) {
        check_finite(W, rows, cols, nthreads, "the edited tensor");
        st.norm_edited = frob(W, rows, cols, nthreads);
    }
    st.edit_s = seconds_since(t0);

    if (measure) {
        t0 = Clock::now();
        st.norm_delta = frob_diff(W, W0, rows, cols, nthreads);
        for (size_t i = 0; i < ops.size(); ++i) {
            if (!is_projection(ops[i])) continue;
            st.ops[i].survived_f32 = residual(coordinates(W, rows, cols, ops[i], nthreads), ref[i], ops[i], cols);
        }
        st.verify_s += seconds_since(t0);
    }

    t0 = Clock::now();
    quantize(W, dst_type, rows, cols, imatrix, dst, nthreads);
    // Finite float values can still overflow the destination type (F16 saturates to inf above 65504): what is
    // written must be what llama.cpp's loader accepts.
    const size_t dst_bytes = static_cast<size_t>(rows) * ggml::row_bytes(dst_type, cols);
    if (!ggml::api().validate_row_data(dst_type, dst, dst_bytes)) {
        throw Error("the result in " + ggml::type_name(dst_type) +
                    " holds NaN/inf values (the edited or requantized weights are out of the type's range)");
    }
    st.quantize_s = seconds_since(t0);

    if (measure) {
        t0 = Clock::now();
        // W0 is no longer needed: reuse it for the dequantized result.
        dequantize(dst, dst_type, rows, cols, W0, nthreads);
        st.norm_quant_err = frob_diff(W0, W, rows, cols, nthreads);
        for (size_t i = 0; i < ops.size(); ++i) {
            if (!is_projection(ops[i])) continue;
            st.ops[i].survived = residual(coordinates(W0, rows, cols, ops[i], nthreads), ref[i], ops[i], cols);
        }
        st.verify_s += seconds_since(t0);
    }
    return st;
}

void write_all(int fd, const void* data, size_t n, int64_t offset) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
        const ssize_t w = ::pwrite(fd, p, n, offset);
        if (w < 0) {
            if (errno == EINTR) continue;
            throw IoError(std::string("cannot write the output: ") + std::strerror(errno) + " (errno " +
                          std::to_string(errno) + ")");
        }
        p += w;
        n -= static_cast<size_t>(w);
        offset += w;
    }
}

uint8_t* output_workspace(size_t n) { return grow(g_ws.out, n); }

void release_workspace() { g_ws = Workspace{}; }

}  // namespace pydetox
